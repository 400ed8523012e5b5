import csv
import json

import pytest
import torch

pytest.importorskip("lightly")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from directpred_plugin import DirectPredHead
import _directpred_bench as cli
from directpred_plugin.benchmarks import compare
from directpred_plugin.benchmarks.predictors import PREDICTOR_SPECS, predictor_names
from directpred_plugin.benchmarks.report import CSV_COLUMNS, SCHEMA, gain_over_untrained
from directpred_plugin.benchmarks.training import build_method
from directpred_plugin.benchmarks.data import DigitsData, build_dataset

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


#: The CLI on a tiny configuration: 1 epoch, 2 predictors, 2 seeds, small model.
TINY_ARGV = ["compare", "--epochs", "1", "--seeds", "0", "1", "--predictors", "directpred", "none",
             "--proj-dim", "16", "--hidden-dim", "32", "--batch-size", "128", "--threads", "1", "--jobs", "1",
             "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The folder of TINY_ARGV's run."""
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    assert cli.main(TINY_ARGV + ["--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    return out


def test_cli_writes_all_result_files(tiny_run):
    for name in ("results.json", "results.csv", "results.md", "accuracy.png", "curves.png"):
        path = tiny_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("accuracy.png", "curves.png"):
        assert (tiny_run / name).read_bytes()[:8] == PNG_MAGIC


def test_results_json_schema(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["schema"] == SCHEMA
    assert results["config"]["predictors"] == ["directpred", "none"]
    assert results["config"]["backbone"] == "small-cnn"  # filled in from the dataset defaults
    assert results["collapse_isotropic_max"] == pytest.approx(16 ** -0.5)
    assert {"processor", "cpu_count", "torch", "device"} <= set(results["machine"])
    runs = results["runs"]
    assert [(r["predictor"], r["seed"]) for r in runs] == [
        ("directpred", 0), ("none", 0), ("directpred", 1), ("none", 1)]
    steps = DigitsData().steps_per_epoch(128)
    for r in runs:
        assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0
        assert 0.0 <= r["collapse"] <= 16 ** -0.5 + 1e-6
        assert r["steps"] == steps and r["ms_per_step"] > 0 and r["peak_memory_mib"] > 0
        assert r["memory_kind"] == "cpu_process_max_rss"
        assert r["history"]["epoch"] == [1] and len(r["history"]["loss"]) == 1
        assert r["predictor_params"] == 0
    by_name = {r["predictor"]: r for r in runs}
    assert 0.0 < by_name["directpred"]["alignment"] <= 1.0
    assert by_name["none"]["alignment"] is None
    assert by_name["directpred"]["predictor_buffers"] > 16 * 16  # F_hat and W_p
    assert [u["seed"] for u in results["untrained"]] == [0, 1]
    summary = {row["predictor"]: row for row in results["summary"]}
    assert summary["directpred"]["seeds"] == 2
    knn = [r["knn_top1"] for r in runs if r["predictor"] == "directpred"]
    assert summary["directpred"]["knn_top1_mean"] == pytest.approx(sum(knn) / 2)
    assert summary["directpred"]["knn_top1_std"] is not None


def test_results_csv_and_markdown(tiny_run):
    with open(tiny_run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["predictor"] for r in rows] == ["directpred", "none", "directpred", "none"]
    assert {r["method"] for r in rows} == {"byol"}
    assert all(0.0 <= float(r["knn_top1"]) <= 1.0 for r in rows)
    table = (tiny_run / "results.md").read_text()
    assert "| predictor | kNN top-1 (%)" in table and "| kNN − untrained |" in table
    for name in ("| directpred |", "| none |", "untrained backbone", "Machine:"):
        assert name in table


def test_every_predictor_builds_and_runs_a_step():
    data = DigitsData()
    cfg = compare.CompareConfig(proj_dim=8, hidden_dim=16, batch_size=16, epochs=1).resolve(data.defaults)
    gen = torch.Generator().manual_seed(0)
    x0, x1 = next(data.views(16, gen, torch.device("cpu")))
    for name in predictor_names("compare"):
        method = build_method(cfg, data, name, seed=0)
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
        for _ in range(2):
            loss, z0 = method.training_loss(x0, x1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert torch.isfinite(loss) and z0.shape == (16, 8), name
        if isinstance(method.predictor, DirectPredHead):
            # the two calls (one per view) of each optimizer step made one update, folded when
            # the optimizer stepped: the paper's per-iteration rule
            assert method.predictor.calls_per_update == "auto" and int(method.predictor.num_updates) == 2
            assert method.predictor.steps.calls == 0
        assert (PREDICTOR_SPECS[name].matrix is None) == (name in ("mlp", "none")), name


def test_same_seed_gives_every_predictor_the_same_start():
    data = DigitsData()
    cfg = compare.CompareConfig(proj_dim=8, hidden_dim=16).resolve(data.defaults)
    a = build_method(cfg, data, "mlp", seed=3)
    b = build_method(cfg, data, "directpred", seed=3)
    c = build_method(cfg, data, "directpred", seed=4)
    for pa, pb in zip(a.backbone.parameters(), b.backbone.parameters()):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.projection_head.parameters(), b.projection_head.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(b.backbone.parameters()), next(c.backbone.parameters()))


def test_digit_views_are_seeded_and_differ():
    data = DigitsData()
    views = [next(data.views(32, torch.Generator().manual_seed(s), torch.device("cpu"))) for s in (0, 0, 1)]
    assert torch.equal(views[0][0], views[1][0]) and torch.equal(views[0][1], views[1][1])
    assert not torch.equal(views[0][0], views[0][1])
    assert not torch.equal(views[0][0], views[2][0])
    assert views[0][0].shape == (32, 1, 8, 8)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="directpred-hybrid"):
        compare.compare(compare.CompareConfig(predictors=["directpred", "mlpp"]))
    with pytest.raises(ValueError, match="--dataset must be one of"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="--epochs must be a positive integer"):
        compare.compare(compare.CompareConfig(epochs=0))
    with pytest.raises(ValueError, match="--backbone must be one of"):
        compare.compare(compare.CompareConfig(backbone="resnet19", epochs=1, progress=False))
    # step's and speed's names are refused before any data is loaded
    with pytest.raises(ValueError, match=r"--backbone must be one of \['fashion-cnn', 'resnet18', "
                                         r"'resnet18-imagenet-stem', 'small-cnn'\] or 'timm:<model name>', "
                                         r"got 'resnet18-cifar'"):
        compare.CompareConfig(backbone="resnet18-cifar").validate()
    with pytest.raises(ValueError, match="compare does not take predictor 'floor'"):
        compare.CompareConfig(predictors=["floor"]).validate()


def test_missing_torchvision_data_says_how_to_get_it(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="--download"):
        build_dataset("cifar10", data_dir=tmp_path)


def test_torchvision_path_with_lightly_transforms(tmp_path, monkeypatch):
    """The cifar10 pipeline (lightly's BYOLTransform, DataLoader) end to end, on FakeData."""
    torchvision = pytest.importorskip("torchvision")

    def fake_cifar(root, download=False, transform=None, train=True):
        return torchvision.datasets.FakeData(size=48 if train else 24, image_size=(3, 32, 32), num_classes=10,
                                             transform=transform, random_offset=0 if train else 1000)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar)
    cfg = compare.CompareConfig(dataset="cifar10", backbone="small-cnn", epochs=1, batch_size=16, proj_dim=8,
                                hidden_dim=16, predictors=["directcopy"], seeds=[0], workers=0, knn_k=3,
                                progress=False, data_dir=str(tmp_path))
    results = compare.compare(cfg)
    (run,) = results["runs"]
    assert run["steps"] == 3 and 0.0 <= run["knn_top1"] <= 1.0


def test_parallel_runs_give_the_serial_numbers(tiny_run, tmp_path):
    """--jobs 2 (spawned workers, one thread each) reproduces the serial run of the same jobs."""
    argv = ["compare", "--epochs", "1", "--seeds", "0", "--predictors", "directpred", "--proj-dim", "16",
            "--hidden-dim", "32", "--batch-size", "128", "--threads", "1", "--jobs", "2", "--no-progress",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    parallel = json.loads((tmp_path / "results.json").read_text())
    serial = json.loads((tiny_run / "results.json").read_text())
    assert parallel["config"]["jobs"] == 2 and parallel["complete"]
    (run,) = parallel["runs"]
    (reference,) = [r for r in serial["runs"] if (r["predictor"], r["seed"]) == ("directpred", 0)]
    for key in ("knn_top1", "linear_top1", "collapse", "effective_rank", "alignment"):
        assert run[key] == reference[key], key
    assert run["history"]["loss"] == reference["history"]["loss"]
    assert parallel["untrained"][0]["knn_top1"] == serial["untrained"][0]["knn_top1"]


#: What a run records about time and memory: the machine's, not the training's.
MEASURED = {"ms_per_step", "train_seconds", "job_seconds", "peak_memory_mib"}


def _numbers(rows):
    return [{key: value for key, value in row.items() if key not in MEASURED and not key.startswith(
        tuple(f"{m}_" for m in MEASURED))} for row in rows]


def test_the_same_run_twice_gives_the_same_numbers(tiny_run, tmp_path):
    """Every number but the timings repeats exactly: seeds fix initialisation, batches, views and probes."""
    assert cli.main(TINY_ARGV + ["--out", str(tmp_path)]) == 0
    first = json.loads((tiny_run / "results.json").read_text())
    again = json.loads((tmp_path / "results.json").read_text())
    for key in ("runs", "untrained", "summary"):
        assert len(again[key]) == len(first[key]) > 0, key
        assert _numbers(again[key]) == _numbers(first[key]), key
    assert again["runs"][0]["history"]["loss"] and again["runs"][0]["knn_top1"] > 0  # compared something


def test_results_are_saved_after_every_run(tmp_path, monkeypatch):
    """An interrupted compare leaves the finished runs on disk, marked incomplete, with their probes."""
    from directpred_plugin.benchmarks import compare as compare_module

    calls = []
    real = compare_module.run_job

    def interrupted(cfg, job, position=1):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg, job, position)

    monkeypatch.setattr(compare_module, "run_job", interrupted)
    cfg = compare.CompareConfig(predictors=["directpred", "none"], seeds=[0], epochs=2, proj_dim=8, hidden_dim=16,
                                subset=256, probe_epochs=[1], progress=False)
    with pytest.raises(KeyboardInterrupt):
        compare.compare(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["complete"] and results["planned_runs"] == 2
    assert [r["predictor"] for r in results["runs"]] == ["directpred"] and len(results["untrained"]) == 1
    assert results["runs"][0]["probes"]["epoch"] == [1, 2]
    assert "incomplete: 1 of 2 runs" in (tmp_path / "results.md").read_text()
    assert "| directpred | " in (tmp_path / "results.md").read_text().split("Along training")[1]
    for name in ("accuracy.png", "probes.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_simsiam_is_lightlys_without_a_target():
    from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead

    data = DigitsData()
    cfg = compare.CompareConfig(method="simsiam", proj_dim=16, hidden_dim=32).resolve(data.defaults)
    mlp = build_method(cfg, data, "mlp", seed=0)
    assert isinstance(mlp.projection_head, SimSiamProjectionHead)
    assert isinstance(mlp.predictor, SimSiamPredictionHead)
    assert mlp.predictor.layers[0].out_features == 4  # the paper's d/4 bottleneck
    assert not any("momentum" in name for name, _ in mlp.named_modules())
    head = build_method(cfg, data, "directpred:eps=0.1", seed=0)
    x0, x1 = next(data.views(16, torch.Generator().manual_seed(0), torch.device("cpu")))
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.01)
    loss, z0 = head.training_loss(x0, x1)
    loss.backward()
    assert -1.0 <= loss.item() <= 1.0 and z0.shape == (16, 16)
    # both views pooled ("auto"); a projector is upstream, so the optimizer step ends the step
    assert head.predictor.eps == 0.1 and head.predictor.steps.calls == 2
    assert int(head.predictor.num_updates) == 0
    optimizer.step()
    # both views pooled into one update, folded when the optimizer stepped
    assert head.predictor.steps.calls == 0 and int(head.predictor.num_updates) == 1


def test_a_closed_form_predictor_is_checked_without_building_a_head(monkeypatch):
    from directpred_plugin import DirectPredHead
    from directpred_plugin.benchmarks import predictors

    built = []

    class Counting(DirectPredHead):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(predictors, "DirectPredHead", Counting)
    predictors.check_predictor("ns:freq=2", "compare")
    assert built == []
    with pytest.raises(ValueError, match="rho must be a number in"):
        predictors.check_predictor("directpred:rho=2", "compare")
    with pytest.raises(ValueError, match=r"'directpred:epsilon=0.1'.*unexpected keyword argument 'epsilon'"):
        predictors.check_predictor("directpred:epsilon=0.1", "compare")
    assert predictors.build_predictor("ns:freq=2", 8, 8).freq == 2 and len(built) == 1


def test_predictor_specs_parse_literals_and_name_bad_ones():
    from directpred_plugin.benchmarks.predictors import build_predictor, parse_predictor_spec

    assert parse_predictor_spec("directpred:eps=0.05,freq=5,trainable=True,refresh=exact") == (
        "directpred", {"eps": 0.05, "freq": 5, "trainable": True, "refresh": "exact"})
    assert parse_predictor_spec("mlp") == ("mlp", {})
    assert build_predictor("directpred:eps=0", 8, 8).eps == 0
    with pytest.raises(ValueError, match=r"eps='0\.0\.5': expected a number"):
        parse_predictor_spec("directpred:eps=0.0.5")
    with pytest.raises(ValueError, match="key=value"):
        parse_predictor_spec("directpred:eps")
    with pytest.raises(ValueError, match="directpred:epsilon=0.1"):
        compare.compare(compare.CompareConfig(predictors=["directpred:epsilon=0.1"]))
    with pytest.raises(ValueError, match="names a predictor twice"):
        compare.compare(compare.CompareConfig(predictors=["none", "none"]))


def test_gain_over_untrained_pairs_runs_with_the_backbone_of_their_seed():
    runs = [{"predictor": "a", "seed": s, "knn_top1": k} for s, k in [(0, 0.80), (1, 0.70)]]
    untrained = [{"seed": 0, "knn_top1": 0.75}, {"seed": 1, "knn_top1": 0.60}]
    mean, std = gain_over_untrained({"runs": runs, "untrained": untrained}, "a", "knn_top1")
    assert mean == pytest.approx(0.075) and std == pytest.approx(0.05 / 2**0.5)
    assert gain_over_untrained({"runs": runs, "untrained": []}, "a", "knn_top1") == (None, None)


PROBE_ARGV = ["compare", "--epochs", "3", "--seeds", "0", "1", "--predictors", "directpred", "none", "--proj-dim", "8",
              "--hidden-dim", "16", "--subset", "256", "--threads", "1", "--jobs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """The tiny run with probes after epochs 1 and 2 (the final epoch 3 adds itself), linear too."""
    out = tmp_path_factory.mktemp("probes")
    assert cli.main(PROBE_ARGV + ["--probe-epochs", "2", "1", "--probe-linear", "--out", str(out)]) == 0
    return out


def test_probes_are_recorded_at_the_requested_epochs(probe_run):
    results = json.loads((probe_run / "results.json").read_text())
    assert results["config"]["probe_epochs"] == [1, 2] and results["config"]["probe_linear"]
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        probes = run["probes"]
        assert probes["epoch"] == [1, 2, 3]
        for key in ("knn_top1", "linear_top1"):
            assert len(probes[key]) == 3 and all(0.0 <= v <= 1.0 for v in probes[key]), key
            assert probes[key][-1] == run[key]  # the final evaluation is the last point
    # the models change between epochs, so the kNN votes do too (not one value copied thrice)
    assert any(len(set(run["probes"]["knn_top1"])) > 1 for run in results["runs"])


def test_probes_leave_the_training_as_it_is(probe_run, tmp_path):
    assert cli.main(PROBE_ARGV + ["--out", str(tmp_path)]) == 0
    plain = json.loads((tmp_path / "results.json").read_text())
    probed = json.loads((probe_run / "results.json").read_text())
    assert all("probes" not in run for run in plain["runs"])
    assert not (tmp_path / "probes.png").exists() and "Along training" not in (tmp_path / "results.md").read_text()
    for a, b in zip(plain["runs"], probed["runs"]):
        assert a["history"]["loss"] == b["history"]["loss"]
        assert (a["knn_top1"], a["linear_top1"], a["collapse"]) == (b["knn_top1"], b["linear_top1"], b["collapse"])


def test_probe_plot_and_table(probe_run):
    assert (probe_run / "probes.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((probe_run / "results.json").read_text())
    table = (probe_run / "results.md").read_text()
    epochs = results["runs"][0]["probes"]["epoch"]
    assert epochs[-1] == 3 and len(epochs) > 2
    header = " | ".join(f"{probe}, epoch {e}" for probe in ("kNN", "linear") for e in epochs)
    assert f"| predictor | {header} |" in table
    assert "scored on the test images" in table.split("Along training")[1]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    early = [r["probes"]["knn_top1"][0] for r in results["runs"] if r["predictor"] == "directpred"]
    mean = 100 * sum(early) / len(early)
    assert rows["directpred"].split(" | ")[1].startswith(f"{mean:.1f} ± ")
    later = [r["probes"]["knn_top1"][1] for r in results["runs"] if r["predictor"] == "directpred"]
    assert rows["directpred"].split(" | ")[2].startswith(f"{100 * sum(later) / len(later):.1f} ± ")
    assert "*untrained backbone*" in rows and "not fitted" not in table


def test_probe_epochs_beyond_training_are_refused():
    with pytest.raises(ValueError, match="--probe-epochs must lie in 1..--epochs"):
        compare.compare(compare.CompareConfig(epochs=2, probe_epochs=[3], predictors=["none"], seeds=[0],
                                              progress=False))


def test_resume_trains_only_the_missing_runs_and_keeps_the_probes(tmp_path, monkeypatch):
    from directpred_plugin.benchmarks import compare as compare_module

    cfg = compare.CompareConfig(predictors=["directpred", "none"], seeds=[0], epochs=2, proj_dim=8, hidden_dim=16,
                                subset=256, probe_epochs=[1], progress=False)
    real = compare_module.run_job
    calls = []

    def interrupted(cfg, job, position=1):
        calls.append(job)
        if job == ("none", 0):
            raise KeyboardInterrupt
        return real(cfg, job, position)

    monkeypatch.setattr(compare_module, "run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare.compare(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())["runs"][0]

    calls.clear()
    monkeypatch.setattr(compare_module, "run_job", lambda cfg, job, position=1: calls.append(job) or real(cfg, job))
    from dataclasses import replace

    results = compare.compare(replace(cfg, jobs=2), tmp_path, resume=True)
    assert calls == [("none", 0)]  # the untrained baseline and directpred came from the folder
    assert results["complete"] and results["resumed_runs"] == 2
    assert [r["predictor"] for r in results["runs"]] == ["directpred", "none"]
    assert results["runs"][0]["probes"] == saved["probes"]
    assert results["runs"][1]["probes"]["epoch"] == [1, 2]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"][0]["probes"] == saved["probes"] and on_disk["complete"]
    assert (tmp_path / "probes.png").read_bytes()[:8] == PNG_MAGIC

    with pytest.raises(ValueError, match=r"other options \(epochs, probe_epochs\)"):
        compare.compare(replace(cfg, epochs=3, probe_epochs=[2]), tmp_path, resume=True)


def test_cli_resume_of_a_finished_folder_trains_nothing(probe_run, tmp_path, monkeypatch):
    import shutil

    from directpred_plugin.benchmarks import compare as compare_module

    shutil.copytree(probe_run, tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(compare_module, "run_job", lambda *args, **kwargs: pytest.fail("retrained a saved run"))
    argv = PROBE_ARGV + ["--probe-epochs", "1", "2", "--probe-linear", "--jobs", "2", "--resume",
                         "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    before = json.loads((probe_run / "results.json").read_text())
    after = json.loads((tmp_path / "results.json").read_text())
    assert after["runs"] == before["runs"] and after["untrained"] == before["untrained"]
    assert after["resumed_runs"] == 6 and after["complete"]
