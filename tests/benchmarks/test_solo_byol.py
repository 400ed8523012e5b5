"""``directpred-bench compare --framework solo`` (directpred_plugin/benchmarks/solo_byol.py).

The option checks and the missing-solo-learn error run everywhere; the runs build and train
solo-learn's BYOL and skip when solo-learn is not importable.
"""

import json
import sys

import pytest
import torch

pytest.importorskip("lightly")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from directpred_plugin import DirectPredHead
import _directpred_bench as cli
from directpred_plugin.benchmarks import compare
from directpred_plugin.benchmarks.frameworks import DEFAULT_PREDICTORS, FRAMEWORKS
from directpred_plugin.benchmarks.predictors import solo_method_kwargs
from directpred_plugin.benchmarks.report import SCHEMA
from directpred_plugin.benchmarks.training import build_method
from directpred_plugin.benchmarks import data as bench_data
from directpred_plugin.benchmarks.data import STL10, DigitsData

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

SOLO_MISSING = (
    "solo-learn not installed: install it from source (git clone "
    "https://github.com/vturrisi/solo-learn), see integrations/solo_learn/README.md"
)
SOLO_PREDICTORS = ["mlp", "directpred", "directpred-hybrid", "directcopy"]
TRAIN, TEST = 256, 128  # digits kept for the runs: 2 steps of 128 per epoch


# ---------------------------------------------------------------- without solo-learn
def test_solo_refuses_the_predictors_its_config_cannot_express():
    with pytest.raises(ValueError, match=r"--framework solo cannot build predictor\(s\) \['linear', 'none'\]; "
                                         r"it supports \['mlp', 'directpred', 'directpred-hybrid', 'directcopy', "
                                         r"'directset', 'ns', 'ns2', 'stiefel', 'visser'\]"):
        compare.compare(compare.CompareConfig(framework="solo", predictors=["mlp", "linear", "none"]))


@pytest.mark.parametrize("backbone", ["small-cnn", "timm:resnet18"])
def test_solo_refuses_backbones_outside_its_registry(backbone):
    with pytest.raises(ValueError, match=rf"--framework solo builds --backbone resnet18 or resnet18-imagenet-stem, "
                                         rf"got '{backbone}'"):
        compare.compare(compare.CompareConfig(framework="solo", backbone=backbone))


def test_defaults_follow_the_framework():
    solo = compare.CompareConfig(framework="solo").resolve(DigitsData.defaults)
    assert solo.predictors == SOLO_PREDICTORS
    assert solo.backbone == "resnet18"  # digits' small-cnn is not a solo-learn backbone
    assert compare.CompareConfig(framework="solo").resolve(STL10.defaults).backbone == "resnet18-imagenet-stem"
    lightly = compare.CompareConfig().resolve(DigitsData.defaults)
    assert lightly.predictors == list(DEFAULT_PREDICTORS) and lightly.backbone == "small-cnn"


def test_without_solo_learn_it_fails_before_loading_data(monkeypatch, tmp_path):
    for name in ("solo", "solo.methods", "solo.methods.base", "solo.utils.auto_resumer"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import solo...` fail

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before solo-learn was checked")

    monkeypatch.setattr(bench_data, "build_dataset", no_data)
    with pytest.raises(ImportError, match=r"--framework solo: .*solo-learn, installed from source.*"
                                          r"pip install --no-deps --no-build-isolation.*integrations/solo_learn"):
        cli.main(["compare", "--framework", "solo", "--predictors", "mlp", "--no-progress", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- with solo-learn
@pytest.fixture(scope="module")
def solo_methods():
    pytest.importorskip("solo.methods", reason=SOLO_MISSING)
    FRAMEWORKS["solo"].require()
    from solo.methods import METHODS

    return METHODS


def small_digits(**options):
    data = DigitsData(**options)
    for split, size in (("train", TRAIN), ("test", TEST)):
        data.images[split] = data.images[split][:size]
        data.labels[split] = data.labels[split][:size]
    return data


@pytest.fixture(scope="module")
def tiny_solo_run(solo_methods, tmp_path_factory):
    """The CLI with --framework solo: 1 epoch of 2 steps, mlp and directpred, one seed."""
    out = tmp_path_factory.mktemp("compare-solo")
    argv = ["compare", "--framework", "solo", "--epochs", "1", "--seeds", "0", "--predictors", "mlp", "directpred",
            "--proj-dim", "16", "--hidden-dim", "32", "--batch-size", "128", "--knn-k", "5", "--no-progress",
            "--jobs", "1", "--out", str(out)]  # one process: worker processes would not see the patch
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(bench_data.DATASETS, "digits", small_digits)
        assert cli.main(argv) == 0
    return json.loads((out / "results.json").read_text()), out


def test_solo_run_results(tiny_solo_run):
    results, out = tiny_solo_run
    assert results["schema"] == SCHEMA
    assert results["config"]["framework"] == "solo" and results["config"]["backbone"] == "resnet18"
    runs = results["runs"]
    assert [(r["predictor"], r["seed"]) for r in runs] == [("mlp", 0), ("directpred", 0)]
    for r in runs:
        assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0
        assert 0.0 <= r["collapse"] <= 16 ** -0.5 + 1e-6
        assert r["steps"] == TRAIN // 128 and r["history"]["epoch"] == [1]
        assert 0.0 <= r["history"]["loss"][0] <= 8.0  # solo's loss: two pairs of 2 - 2 cos
    mlp, directpred = runs
    # solo-learn's MLP: Linear(16, 32) + BatchNorm1d(32) + Linear(32, 16), biases on
    assert mlp["predictor_params"] == (16 * 32 + 32) + 2 * 32 + (32 * 16 + 16)
    assert mlp["alignment"] is None
    assert directpred["predictor_params"] == 0 and directpred["predictor_buffers"] > 16 * 16
    assert 0.0 < directpred["alignment"] <= 1.0
    assert [u["seed"] for u in results["untrained"]] == [0]
    assert [row["predictor"] for row in results["summary"]] == ["mlp", "directpred"]
    assert "via `solo`" in (out / "results.md").read_text()


def build(predictor, seed=0, backbone="resnet18"):
    cfg = compare.CompareConfig(framework="solo", backbone=backbone, proj_dim=8, hidden_dim=16)
    return build_method(cfg.resolve(DigitsData.defaults), DigitsData, predictor, seed)


def test_the_predictor_comes_from_solos_config_key(solo_methods):
    import solo.methods

    heads = {}
    for name in SOLO_PREDICTORS:
        model = build(name)
        assert isinstance(model.solo, solo_methods["byol"]) and isinstance(model.solo, solo.methods.BYOL)
        # the same name in solo-learn's config, and only the options the spec gives
        assert model.solo.cfg.method_kwargs.predictor == solo_method_kwargs(name)["predictor"] == name
        if name != "mlp":
            assert dict(model.solo.cfg.method_kwargs.directpred) == {"calls_per_update": "auto"}
        heads[name] = model.predictor
    assert isinstance(heads["mlp"], torch.nn.Sequential)  # solo-learn's own predictor
    for name in ("directpred", "directpred-hybrid", "directcopy"):
        assert isinstance(heads[name], DirectPredHead), name
        assert heads[name].calls_per_update == "auto", name  # the two views of a step make one update
    assert (heads["directpred-hybrid"].freq, heads["directpred-hybrid"].trainable) == (5, True)
    assert heads["directcopy"].variant == "directcopy" and heads["directpred"].variant == "directpred"


def test_a_step_uses_solos_loss_and_momentum_updater(solo_methods):
    from solo.losses.byol import byol_loss_func

    model = build("directpred").train()
    seen = {"predictor": [], "momentum_projector": []}
    for attr, outputs in seen.items():
        getattr(model.solo, attr).register_forward_hook(lambda m, i, out, outputs=outputs: outputs.append(out))
    x0, x1 = next(DigitsData().views(16, torch.Generator().manual_seed(0), torch.device("cpu")))
    loss, z0 = model.training_loss(x0, x1)
    # both views pooled, to be folded when the optimizer steps ("auto")
    assert z0.shape == (16, 8) and model.predictor.steps.calls == 2
    (p0, p1), (t0, t1) = seen["predictor"], seen["momentum_projector"]
    # as BYOL.training_step pairs them: each view's prediction against the other view's target
    assert loss.item() == pytest.approx((byol_loss_func(p1, t0) + byol_loss_func(p0, t1)).item(), rel=1e-5)
    assert loss.item() != pytest.approx((byol_loss_func(p0, t0) + byol_loss_func(p1, t1)).item(), rel=1e-5)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    online, target = model.solo.projector[0].weight, model.solo.momentum_projector[0].weight
    before = target.detach().clone()
    assert not torch.equal(online, before)
    model.update_target(0.75)
    assert torch.allclose(target, 0.75 * before + 0.25 * online)


def test_same_seed_same_start_and_solos_stems(solo_methods):
    a, b, c = build("mlp", 3), build("directpred", 3), build("directpred", 4)
    for attr in ("backbone", "projector"):
        for pa, pb in zip(getattr(a.solo, attr).parameters(), getattr(b.solo, attr).parameters()):
            assert torch.equal(pa, pb), attr
    assert not torch.equal(b.solo.backbone.conv1.weight, c.solo.backbone.conv1.weight)
    assert a.solo.backbone.conv1.stride == (1, 1) and isinstance(a.solo.backbone.maxpool, torch.nn.Identity)
    assert build("mlp", backbone="resnet18-imagenet-stem").solo.backbone.conv1.stride == (2, 2)
