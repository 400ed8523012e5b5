"""The lightly adapter with the real lightly package and Lightning, on CPU."""

import builtins
import csv
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import lightning.pytorch
import pytest
import pytorch_lightning
import torch
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    NNCLRPredictionHead,
    SimSiamPredictionHead,
    SMoGPredictionHead,
)
from torch import nn
from torch.utils.data import DataLoader

from _helpers import assert_same_state
from _lightly_models import DIM, TwoViews, byol_class, quiet_trainer_options
from directpred_plugin import DirectPredHead
from directpred_plugin import lightly as adapter
from directpred_plugin.lightly import (
    DirectPredDiagnostics,
    DirectPredPredictionHead,
    ReplacedHead,
    replace_prediction_heads,
)

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

TESTS = Path(__file__).resolve().parent
RECIPES = TESTS.parent / "integrations" / "lightly"
FLAVOURS = {"pytorch_lightning": pytorch_lightning, "lightning.pytorch": lightning.pytorch}


class StepRecorder(pytorch_lightning.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(pl, model, tmp_path, ckpt_path=None, **trainer_options):
    options = {**quiet_trainer_options(), "logger": False, "enable_checkpointing": False, **trainer_options}
    trainer = pl.Trainer(default_root_dir=tmp_path, **options)
    trainer.fit(model, DataLoader(TwoViews(), batch_size=8), ckpt_path=ckpt_path)
    return trainer


# ----------------------------------------------------------------------- the head itself
def test_prediction_head_is_square_and_follows_lightly_conventions():
    head = DirectPredPredictionHead(input_dim=32, output_dim=32, rho=0.5, calls_per_update=2)
    assert isinstance(head, DirectPredHead) and head.dim == 32 and head.rho == 0.5
    # lightly's BYOLPredictionHead() is 256 wide and SimSiamPredictionHead() 2048: no default fits both
    with pytest.raises(TypeError, match=r"needs input_dim.*SimSiamPredictionHead\(\) to 2048"):
        DirectPredPredictionHead()
    with pytest.raises(ValueError, match="square"):
        DirectPredPredictionHead(input_dim=256, output_dim=128)


@pytest.mark.parametrize("lightly_head", [BYOLPredictionHead, SimSiamPredictionHead, NNCLRPredictionHead])
def test_prediction_head_takes_the_positional_arguments_of_the_head_it_replaces(lightly_head):
    defaults = inspect.signature(lightly_head).parameters
    args = [defaults[name].default for name in ("input_dim", "hidden_dim", "output_dim")]
    head = DirectPredPredictionHead(*args)
    assert head.dim == args[0] and head.weight.shape == (args[0], args[0])  # hidden_dim plays no part
    assert DirectPredPredictionHead(*args[:2]).dim == args[0]
    with pytest.raises(ValueError, match=r"maps input_dim to itself \(got input_dim=16, output_dim=8\)"):
        DirectPredPredictionHead(16, 64, 8)


def test_prediction_head_defaults_to_the_head_default_update_rule():
    """One update per optimizer step ("auto"), the head's own default: the adapter adds none of its own."""
    assert DirectPredPredictionHead(8).calls_per_update == DirectPredHead(8).calls_per_update == "auto"
    assert not hasattr(adapter, "DEFAULT_CALLS_PER_UPDATE")
    assert DirectPredPredictionHead(8, calls_per_update=3).calls_per_update == 3
    (replaced,) = replace_prediction_heads(_wrap(BYOLPredictionHead(8, 16, 8)))
    assert replaced.new.calls_per_update == "auto"


# --------------------------------------------------------------------- training in Lightning
def test_renamed_byol_head_trains_in_a_lightning_trainer(tmp_path):
    """BYOLPredictionHead(DIM, 32, DIM) -> DirectPredPredictionHead(DIM, 32, DIM), nothing else."""
    model = byol_class(pytorch_lightning)()
    recorder = StepRecorder()
    trainer = fit(pytorch_lightning, model, tmp_path, max_steps=3, callbacks=[recorder])
    assert trainer.global_step == 3 and all(torch.isfinite(torch.tensor(recorder.losses)))
    head = model.prediction_head
    assert type(head) is DirectPredPredictionHead and list(head.parameters()) == []
    # one update per step ("auto"), folded when the step's optimizer stepped
    assert int(head.num_updates) == 3 and head.steps.calls == 0 and head.steps.steps == 3
    assert (head.weight - torch.eye(DIM)).abs().max() > 0.05



def test_lightly_byol_trains_with_directpred_head(tmp_path):
    model = byol_class(pytorch_lightning)(calls_per_update=2)
    recorder = StepRecorder()
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    trainer = fit(pytorch_lightning, model, tmp_path, max_steps=6, callbacks=[recorder])

    assert len(recorder.losses) == 6 and all(torch.isfinite(torch.tensor(recorder.losses)))
    head = model.prediction_head
    assert int(head.num_updates) == 6  # two views, one update per step
    assert (head.weight - torch.eye(DIM)).abs().max() > 0.05
    # As in lightly's example the optimizer gets self.parameters(); what it trains is the
    # online backbone and projection head, and nothing of a predictor.
    assert list(head.parameters()) == []
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    trained = {id(p) for p in optimized if p.requires_grad}
    online = {id(p) for m in (model.backbone, model.projection_head) for p in m.parameters()}
    assert trained == online
    assert {id(p) for p in optimized} == {id(p) for p in model.parameters()}
    assert any(not torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))


# ---------------------------------------------------------------------------- swap helper
class ManyHeads(nn.Module):
    """Heads nested in a list and a dict, one registered twice, next to a projection head."""

    def __init__(self):
        super().__init__()
        self.projection_head = BYOLProjectionHead(16, 32, 12)
        self.byol = BYOLPredictionHead(12, 48, 12)
        self.branches = nn.ModuleList([SimSiamPredictionHead(20, 5, 20), nn.Linear(3, 3)])
        self.heads = nn.ModuleDict({"nnclr": NNCLRPredictionHead(6, 24, 6), "smog": SMoGPredictionHead(10, 20, 10)})
        self.byol_again = self.byol


def test_swap_replaces_every_lightly_prediction_head():
    model = ManyHeads()
    old_byol, old_simsiam, old_nnclr = model.byol, model.branches[0], model.heads["nnclr"]
    replaced = replace_prediction_heads(model, rho=0.5, calls_per_update=2)

    assert all(isinstance(r, ReplacedHead) for r in replaced)
    assert [(r.name, type(r.old), r.new.dim) for r in replaced] == [
        ("byol", BYOLPredictionHead, 12),
        ("branches.0", SimSiamPredictionHead, 20),
        ("heads.nnclr", NNCLRPredictionHead, 6),
    ]
    assert [r.old for r in replaced] == [old_byol, old_simsiam, old_nnclr]
    assert model.byol is replaced[0].new and model.byol_again is model.byol  # shared stays shared
    assert model.branches[0] is replaced[1].new and model.heads["nnclr"] is replaced[2].new
    for r in replaced:
        assert type(r.new) is DirectPredPredictionHead and r.new.rho == 0.5 and r.new.calls_per_update == 2
    # Projection heads, plain layers and SMoG's prototype-scored predictor stay.
    assert isinstance(model.projection_head, BYOLProjectionHead)
    assert isinstance(model.heads["smog"], SMoGPredictionHead)
    assert not any(isinstance(m, (BYOLPredictionHead, SimSiamPredictionHead, NNCLRPredictionHead)) for m in model.modules())
    assert sum(isinstance(m, DirectPredHead) for m in model.modules()) == 3
    out = model.byol(model.projection_head(torch.randn(4, 16)))
    assert out.shape == (4, 12)


def test_swap_takes_other_head_types_and_keeps_mode():
    model = ManyHeads().eval()
    replaced = replace_prediction_heads(model, head_types=[SMoGPredictionHead])
    assert [(r.name, r.new.dim) for r in replaced] == [("heads.smog", 10)]
    assert not model.heads["smog"].training
    assert isinstance(model.byol, BYOLPredictionHead)


def test_swap_rejects_what_it_cannot_replace():
    with pytest.raises(ValueError, match=r"'head'.*square"):
        replace_prediction_heads(_wrap(BYOLPredictionHead(8, 16, 4)))
    with pytest.raises(ValueError, match="itself a BYOLPredictionHead"):
        replace_prediction_heads(BYOLPredictionHead(8, 16, 8))
    with pytest.raises(ValueError, match="no nn.Linear"):
        replace_prediction_heads(_wrap(nn.ReLU()), head_types=[nn.ReLU])
    with pytest.raises(ValueError, match="head_types"):
        replace_prediction_heads(_wrap(nn.ReLU()), head_types=["ReLU"])


def test_swap_refuses_a_model_without_the_head_types():
    """lightly's SMoG: its SMoGPredictionHead is not swapped by default, and a call that swaps
    nothing would leave the model training its MLP."""
    smog = nn.ModuleDict({"projection_head": BYOLProjectionHead(16, 32, 10),
                          "prediction_head": SMoGPredictionHead(10, 20, 10)})
    with pytest.raises(ValueError, match=r"found no BYOLPredictionHead or SimSiamPredictionHead or "
                                         r"NNCLRPredictionHead in ModuleDict.*head_types="):
        replace_prediction_heads(smog)
    with pytest.raises(ValueError, match=r"found no ReLU in Module.*head_types="):
        replace_prediction_heads(_wrap(nn.Linear(3, 3)), head_types=nn.ReLU)
    assert isinstance(smog["prediction_head"], SMoGPredictionHead)
    (replaced,) = replace_prediction_heads(smog, head_types=SMoGPredictionHead)
    # Called again on a model that already has DirectPred heads: nothing left to do, nothing refused.
    assert replace_prediction_heads(smog) == [] and smog["prediction_head"] is replaced.new


def test_swap_takes_one_class_as_head_types():
    (replaced,) = replace_prediction_heads(_wrap(nn.Linear(4, 4)), head_types=nn.Linear)
    assert replaced.name == "head" and replaced.new.dim == 4


def _wrap(module):
    wrapper = nn.Module()
    wrapper.head = module
    return wrapper


def test_swapped_lightly_model_trains_without_mlp_parameters(tmp_path):
    model = byol_class(pytorch_lightning)(head="mlp")
    old_params = {id(p) for p in model.prediction_head.parameters()}
    assert old_params  # lightly's MLP predictor
    replaced = replace_prediction_heads(model, calls_per_update=2)
    assert [(r.name, r.new.dim) for r in replaced] == [("prediction_head", DIM)]
    trainer = fit(pytorch_lightning, model, tmp_path, max_steps=2)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & old_params
    assert int(model.prediction_head.num_updates) == 2


# --------------------------------------------------------------------- checkpoint / resume
class HeadSnapshots(pytorch_lightning.Callback):
    def __init__(self):
        self.at_start = None
        self.at_epoch_end = []

    def on_train_start(self, trainer, pl_module):
        self.at_start = _head_state(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.at_epoch_end.append(_head_state(pl_module))


def _head_state(model):
    head = model.prediction_head
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in head.state_dict().items()}
    state["host_updates"] = int(head.diagnostics()["num_steps"])
    return state


def _assert_same(a, b):
    assert_same_state(a, b)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_checkpoint_resume_restores_head_exactly(tmp_path):
    TinyBYOL = byol_class(pytorch_lightning)
    options = dict(calls_per_update=2, freq=3)  # refreshes every 3rd update: the counter must survive
    torch.manual_seed(0)
    full = TinyBYOL(**options)
    snapshots = HeadSnapshots()
    checkpoints = pytorch_lightning.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    fit(pytorch_lightning, full, tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[snapshots, checkpoints])
    after_epoch_0, after_epoch_1 = snapshots.at_epoch_end
    assert after_epoch_0["host_updates"] == 8 and after_epoch_1["host_updates"] == 16

    torch.manual_seed(1)  # a different initialisation, all of which the checkpoint must overwrite
    resumed = TinyBYOL(**options)
    resumed_snapshots = HeadSnapshots()
    ckpt = next((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    fit(pytorch_lightning, resumed, tmp_path, max_epochs=2, callbacks=[resumed_snapshots], ckpt_path=ckpt)

    _assert_same(resumed_snapshots.at_start, after_epoch_0)  # W_p, F_hat, counters, pending pool
    _assert_same(resumed_snapshots.at_epoch_end[-1], after_epoch_1)  # and training continues identically
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------- DDP
@pytest.mark.timeout(240)
@pytest.mark.parametrize("setting", [[], ["--auto-no-broadcast"]], ids=["calls2-broadcast", "auto-no-broadcast"])
def test_lightning_ddp_ranks_hold_identical_predictor(tmp_path, setting):
    script = TESTS / "lightly_ddp_script.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *setting], capture_output=True, text=True, timeout=220,
        cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    assert rank0["world_size"] == rank1["world_size"] == 2
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])  # each rank saw its own data
    assert len(rank0["weights"]) == len(rank1["weights"]) == 4
    for w0, w1 in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(w0, w1)
    _assert_same(rank0["state"], rank1["state"])
    gathered = rank0["gathered"]  # all_gather of W_p over ranks, inside the run
    assert gathered.shape == (2, DIM, DIM) and torch.equal(gathered[0], gathered[1])
    assert (rank0["state"]["weight"] - torch.eye(DIM)).abs().max() > 0.05
    assert int(rank0["num_updates"]) == int(rank1["num_updates"]) == 4  # one update per step on every rank


# ---------------------------------------------------------------------- diagnostics callback
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_diagnostics_callback_logs_to_csv(tmp_path, flavour):
    pl = FLAVOURS[flavour]
    model = byol_class(pl)(calls_per_update=2)
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    fit(pl, model, tmp_path, max_steps=4, logger=logger, callbacks=[DirectPredDiagnostics(every_n_steps=2)])

    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("directpred/prediction_head/alignment")]
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert [float(row["directpred/prediction_head/num_updates"]) for row in rows] == [2.0, 4.0]
    for row in rows:
        assert float(row["directpred/prediction_head/alignment"]) == pytest.approx(1.0, abs=1e-6)
        assert "directpred/prediction_head/last_collapse" not in row  # gone from diagnostics()
        assert 1.0 <= float(row["directpred/prediction_head/rankme"]) <= DIM
        assert float(row["directpred/prediction_head/corr_eig_max"]) > 0
        assert float(row["directpred/prediction_head/weight_eig_max"]) == pytest.approx(1.0 + model.prediction_head.eps, abs=1e-5)


def test_diagnostics_callback_logs_each_step_once_under_gradient_accumulation(tmp_path):
    model = byol_class(pytorch_lightning)(calls_per_update=2)
    logger = pytorch_lightning.loggers.CSVLogger(tmp_path, name="run")
    fit(pytorch_lightning, model, tmp_path, max_steps=2, accumulate_grad_batches=2, logger=logger,
        callbacks=[DirectPredDiagnostics(every_n_steps=1)])
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("directpred/prediction_head/num_updates")]
    # Two batches per optimizer step, one head update per batch (two views each).
    assert [(int(row["step"]), float(row["directpred/prediction_head/num_updates"])) for row in rows] == [(1, 2.0), (2, 4.0)]


def test_diagnostics_callback_rejects_useless_setups(tmp_path):
    with pytest.raises(ValueError, match="has none"):
        fit(pytorch_lightning, byol_class(pytorch_lightning)(), tmp_path, max_steps=1, callbacks=[DirectPredDiagnostics()])
    with pytest.raises(ValueError, match="no DirectPredHead"):
        fit(pytorch_lightning, byol_class(pytorch_lightning)(head="mlp"), tmp_path, max_steps=1, logger=True,
            callbacks=[DirectPredDiagnostics()])
    with pytest.raises(ValueError, match="every_n_steps"):
        DirectPredDiagnostics(every_n_steps=0)


# ---------------------------------------------------------------------- missing extras
def _hide_modules(monkeypatch, *roots):
    """Make ``import root`` (and its submodules) fail as if the package were not installed."""
    for name in list(sys.modules):
        if name.split(".")[0] in roots or name in roots:
            monkeypatch.setitem(sys.modules, name, None)
    for root in roots:
        monkeypatch.setitem(sys.modules, root, None)
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name.split(".")[0] in roots or name in roots:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)


def test_swap_without_lightly_names_the_extra(monkeypatch):
    _hide_modules(monkeypatch, "lightly")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lightly\]" in a checkout'):
        replace_prediction_heads(ManyHeads())
    # The head itself and an explicit head_types need no lightly.
    assert DirectPredPredictionHead(8).dim == 8
    assert len(replace_prediction_heads(_wrap(nn.Linear(4, 4)), head_types=[nn.Linear])) == 1


def test_callback_without_lightning_names_the_extra(monkeypatch):
    _hide_modules(monkeypatch, "lightning", "pytorch_lightning")
    monkeypatch.delitem(sys.modules, "directpred_plugin.callbacks")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lightly\]" in a checkout'):
        adapter.DirectPredDiagnostics


def test_adapter_imports_without_lightly_or_lightning(monkeypatch):
    _hide_modules(monkeypatch, "lightly", "lightning", "pytorch_lightning")
    monkeypatch.delitem(sys.modules, "directpred_plugin.lightly")
    spec = importlib.util.find_spec("directpred_plugin.lightly")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DirectPredPredictionHead(4).dim == 4


def test_star_import_exports_the_callback():
    namespace = {}
    exec("from directpred_plugin.lightly import *", namespace)
    assert namespace["DirectPredDiagnostics"] is DirectPredDiagnostics
    assert namespace["DirectPredPredictionHead"] is DirectPredPredictionHead


def test_callback_class_is_one_class_for_both_flavours():
    assert isinstance(DirectPredDiagnostics(), pytorch_lightning.Callback)
    assert isinstance(DirectPredDiagnostics(), lightning.pytorch.Callback)
    assert adapter.DirectPredDiagnostics is DirectPredDiagnostics
    assert DirectPredDiagnostics.__module__ == "directpred_plugin.callbacks"
    # a class statement of its own, which readers and type checkers see
    assert "class DirectPredDiagnostics(LightningCallback, PytorchLightningCallback)" in inspect.getsource(
        sys.modules["directpred_plugin.callbacks"])


# ---------------------------------------------------------------------------- recipes
def _load_recipe(name, monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"lightly_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_recipe_smoke_on_digits(tmp_path, monkeypatch, name):
    recipe = _load_recipe(name, monkeypatch)
    trainer, model = recipe.main([
        "--max-steps", "2", "--batch-size", "4", "--num-workers", "0", "--accelerator", "cpu",
        "--log-every", "1", "--output-dir", str(tmp_path),
    ])
    assert trainer.global_step == 2
    head = model.prediction_head
    # Two views per step, one update per step (the default "auto" pools them), folded when
    # the step's optimizer stepped.
    assert isinstance(head, DirectPredPredictionHead) and head.calls_per_update == "auto"
    assert int(head.num_updates) == 2 and head.steps.calls == 0
    assert not any(isinstance(m, (BYOLPredictionHead, SimSiamPredictionHead)) for m in model.modules())
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    metrics = next(Path(tmp_path).rglob("metrics.csv")).read_text()
    assert "directpred/prediction_head/alignment" in metrics


def test_recipe_short_run_still_logs_and_says_where(tmp_path, monkeypatch, capsys):
    recipe = _load_recipe("byol", monkeypatch)
    # 2 steps, fewer than the default --log-every (50)
    trainer, _ = recipe.main(["--max-steps", "2", "--batch-size", "4", "--num-workers", "0",
                              "--accelerator", "cpu", "--output-dir", str(tmp_path)])
    assert trainer.global_step == 2
    (metrics,) = Path(tmp_path).rglob("metrics.csv")
    with open(metrics, newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("directpred/prediction_head/alignment")]
    assert steps == [2]
    assert f"(every 2 steps) were logged to {metrics.parent}" in capsys.readouterr().out


def test_recipe_logging_interval_fits_the_run(monkeypatch):
    _load_recipe("byol", monkeypatch)
    interval = importlib.import_module("_recipe").logging_interval
    assert interval(50, 7, -1) == 7 and interval(50, 7, 3) == 3 and interval(5, 7, -1) == 5


def test_recipe_data_falls_back_to_digits_offline(tmp_path, monkeypatch):
    _load_recipe("byol", monkeypatch)
    data = importlib.import_module("_recipe")
    with pytest.warns(RuntimeWarning, match="digits"):
        dataset = data.load_dataset("cifar10", str(tmp_path), False, lambda name: name)
    # An offline --download into a new folder leaves nothing behind.
    def offline(root, **kwargs):
        Path(root).mkdir(parents=True)  # as torchvision does before it downloads
        raise RuntimeError("offline")

    monkeypatch.setattr(data.torchvision.datasets, "CIFAR10", offline)
    with pytest.warns(RuntimeWarning, match="offline"):
        data.load_dataset("cifar10", str(tmp_path / "new" / "cifar"), True, lambda name: name)
    assert not (tmp_path / "new").exists()
    assert isinstance(dataset, data.Digits) and len(dataset) == 1797
    image, label = data.Digits()[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0
    assert dataset.transform == "digits"
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("imagenet", str(tmp_path), False, lambda name: name)
