"""Client code around a model that contains the head, against the behaviour it guarantees.

Each test is what a user's training script, checkpoint code or library integration does with
a model holding a ``DirectPredHead`` — never the head's internals:

1. every value of ``model.state_dict()`` is a tensor (as for BatchNorm), so safetensors,
   ``{k: v.cpu()}`` and ``{k: v.clone()}`` work;
2. a state dict loaded from a plain dict (prefix stripped after DataParallel, a comprehension
   that drops ``_metadata``, ``strict=False``, safetensors, ``torch.load(weights_only=True)``)
   restores the model, and training on from it equals the uninterrupted run;
3. a checkpoint whose options change the meaning of the state (``center``, ``variant``,
   ``dim``) is refused with an error naming the option, also from a plain dict and with
   ``strict=False``;
4. weight averaging (torch ``AveragedModel`` with buffers, timm ``ModelEmaV2``/``ModelEmaV3``,
   Lightning's ``EMAWeightAveraging``) runs, and after the average is copied back into the live
   model its counters still agree with its schedule and the optimizer steps taken;
5. an eval-mode model exports (ONNX, ``torch.export``, ``torch.jit.trace``) with the eager output;
6. a leaf tensor fed to the head for many steps does not accumulate backward hooks.

Every state is taken "between steps" (after ``opt.step()``) and "mid-step" (after a
training-mode forward whose backward never ran, so the head's pool of the step is open).
"""

from __future__ import annotations

import importlib.util
import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from directpred_plugin import DirectPredHead

DIM = 8
IN_FEATURES = 12
BATCH = 16
LR = 0.05

CONFIGS = {
    "default": {},
    "center": {"center": True},
    "directcopy": {"variant": "directcopy"},
    "trainable-freq2": {"trainable": True, "freq": 2},
    "stats-float64": {"stats_dtype": torch.float64},
}
WHERE = ["between-steps", "mid-step"]
COUNTERS = ("num_updates", "num_steps", "num_skipped", "refresh_rejections", "exact_refreshes",
            "thorough_refreshes")


class Model(nn.Module):
    """A projector and the head as BYOL's prediction head, as lightly's BYOL example builds them."""

    def __init__(self, dim: int = DIM, **options) -> None:
        super().__init__()
        self.projector = nn.Linear(IN_FEATURES, dim)
        self.prediction_head = DirectPredHead(dim, calls_per_update="auto", **options)

    def forward(self, x):
        return self.prediction_head(self.projector(x))


def make_model(config: str = "default", dim: int = DIM, **overrides) -> Model:
    torch.manual_seed(0)  # equal initial projectors across the runs compared
    return Model(dim, **{**CONFIGS[config], **overrides})


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR)  # stateless: resuming needs the model alone


def views(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, IN_FEATURES, generator=gen), torch.randn(BATCH, IN_FEATURES, generator=gen)


def train(model, optimizer, steps: range) -> None:
    """BYOL-like steps: two views, the prediction of each against the other's detached projection."""
    for step in steps:
        x0, x1 = views(step)
        z0, z1 = model.projector(x0), model.projector(x1)
        p0, p1 = model.prediction_head(z0), model.prediction_head(z1)
        loss = -(F.cosine_similarity(p0, z1.detach()).mean() + F.cosine_similarity(p1, z0.detach()).mean()) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def forward_without_backward(model) -> None:
    """A training-mode forward whose backward never runs (a metric, a shape check): saving after it is mid-step."""
    gen = torch.Generator().manual_seed(7)
    model(torch.randn(BATCH, IN_FEATURES, generator=gen))


def train_until_saved(model, optimizer, where: str, steps: int = 3) -> None:
    train(model, optimizer, range(steps))
    if where == "mid-step":
        forward_without_backward(model)


def observed(model) -> dict:
    """What a client can observe of the model: parameters, W_p, F_hat (and mean), the counters."""
    head = model.prediction_head
    state = {"projector.weight": model.projector.weight.detach().clone(),
             "projector.bias": model.projector.bias.detach().clone(),
             "weight": head.weight.detach().clone(), "corr": head.corr.clone()}
    if head.center:
        state["mean"] = head.mean.clone()
    diagnostics = head.diagnostics()
    state.update({name: diagnostics[name] for name in COUNTERS})
    return state


def assert_same(a: dict, b: dict, tight: bool = False) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            tol = dict(rtol=1e-6, atol=1e-7) if tight else dict(rtol=0, atol=0)
            torch.testing.assert_close(b[key], a[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert a[key] == b[key], f"{key}: {a[key]} != {b[key]}"


def assert_counters(head, steps: int, when: str = "") -> None:
    diagnostics = head.diagnostics()
    assert (diagnostics["num_updates"], diagnostics["num_steps"]) == (steps, steps), (
        f"after {steps} optimizer steps{when}: num_updates={diagnostics['num_updates']}, "
        f"num_steps={diagnostics['num_steps']}")


# ------------------------------------------------------------------ 1. tensors only
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_holds_only_tensors_and_round_trips_through_safetensors(config, where, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(config)
    train_until_saved(model, sgd(model), where)
    state = model.state_dict()
    others = {key: type(value).__name__ for key, value in state.items() if not isinstance(value, torch.Tensor)}
    assert not others, f"state_dict values that are not tensors: {others}"
    # what clients do with a state dict of tensors
    on_cpu = {key: value.cpu() for key, value in state.items()}
    cloned = {key: value.clone() for key, value in state.items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    loaded = load_file(str(path))
    for copy in (on_cpu, cloned, loaded):
        assert copy.keys() == state.keys()
        assert all(torch.equal(copy[key], state[key]) for key in state)
    fresh = make_model(config)
    fresh.load_state_dict(loaded)
    assert_same(observed(model), observed(fresh))


# ----------------------------------------------------------- 2. plain dicts and resume
class Wrapper(nn.Module):
    """The key layout of DistributedDataParallel and DataParallel (``module.`` + the model's keys),
    without their device placement (DataParallel moves the model to cuda:0 where there is one)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def checkpoint_through(route: str, model, tmp_path):
    """The model's state as a client's checkpoint code writes it and reads it back: (state, strict)."""
    path = tmp_path / "checkpoint"
    if route == "torch.save":
        torch.save(model.state_dict(), path)
        return torch.load(path, weights_only=True), True
    if route == "wrapper-prefix-stripped":
        torch.save(Wrapper(model).state_dict(), path)  # keys "module.…", as DDP and DataParallel write them
        return {key.removeprefix("module."): value for key, value in torch.load(path, weights_only=True).items()}, True
    if route == "comprehension-strict-false":
        torch.save({key: value for key, value in model.state_dict().items()}, path)  # no _metadata
        return torch.load(path, weights_only=True), False
    if route == "safetensors":
        from safetensors.torch import load_file, save_file

        save_file(model.state_dict(), str(path))
        return load_file(str(path)), True
    raise AssertionError(route)


ROUTES = ["torch.save", "wrapper-prefix-stripped", "comprehension-strict-false", "safetensors"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("config", CONFIGS)
def test_resume_from_a_plain_checkpoint_continues_as_the_uninterrupted_run(config, where, route, tmp_path):
    straight = make_model(config)
    optimizer = sgd(straight)
    train_until_saved(straight, optimizer, where)
    train(straight, optimizer, range(3, 6))

    first = make_model(config)
    train_until_saved(first, sgd(first), where)
    state, strict = checkpoint_through(route, first, tmp_path)
    resumed = make_model(config)
    result = resumed.load_state_dict(state, strict=strict)
    assert not result.missing_keys and not result.unexpected_keys, result
    assert_same(observed(first), observed(resumed))  # the loaded model equals the saved one
    train(resumed, sgd(resumed), range(3, 6))
    assert_same(observed(straight), observed(resumed), tight=True)
    assert_counters(resumed.prediction_head, 6)


# ------------------------------------------------------------- 3. options refused on load
MISMATCHES = {  # (option named in the error, saved model's options, loading model's options)
    "center-false-to-true": ("center", dict(), dict(center=True)),
    "center-true-to-false": ("center", dict(center=True), dict()),
    "directpred-to-directcopy": ("variant", dict(), dict(variant="directcopy")),
    "directcopy-to-directpred": ("variant", dict(variant="directcopy"), dict()),
    "dim-8-to-10": ("dim", dict(dim=8), dict(dim=10)),
}


@pytest.mark.parametrize("how", ["state_dict-strict", "plain-dict-strict", "plain-dict-strict-false"])
@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_checkpoint_with_options_that_change_the_state_is_refused_naming_the_option(mismatch, how):
    option, saved_options, loading_options = MISMATCHES[mismatch]
    saved = Model(**saved_options)
    train(saved, sgd(saved), range(2))
    state = saved.state_dict()
    if how.startswith("plain-dict"):
        state = {key: value for key, value in state.items()}  # drops _metadata
    model = Model(**loading_options)
    with pytest.raises((RuntimeError, ValueError), match=rf"\b{re.escape(option)}\b"):
        model.load_state_dict(state, strict=how != "plain-dict-strict-false")


# -------------------------------------------------------------------- 4. weight averaging
def swa_ema(model):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    return averaged, averaged.update_parameters


def timm_ema_v2(model):
    from timm.utils import ModelEmaV2

    ema = ModelEmaV2(model, decay=0.9)
    return ema, ema.update


def timm_ema_v3(model):
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=0.9)
    return ema, ema.update


AVERAGERS = {"torch-AveragedModel-ema-buffers": swa_ema, "timm-ModelEmaV2": timm_ema_v2,
             "timm-ModelEmaV3": timm_ema_v3}


def copy_back(averaged: nn.Module, model: nn.Module, how: str) -> None:
    """Put the average into the live model, as Lightning does at the end of training."""
    if how == "params-and-buffers":
        with torch.no_grad():
            for average, current in zip([*averaged.parameters(), *averaged.buffers()],
                                        [*model.parameters(), *model.buffers()]):
                current.copy_(average)
    else:
        model.load_state_dict(averaged.state_dict())


@pytest.mark.parametrize("copy_how", ["params-and-buffers", "load_state_dict"])
@pytest.mark.parametrize("averager", AVERAGERS)
@pytest.mark.parametrize("config", CONFIGS)
def test_weight_averaging_keeps_the_counters_of_the_live_head(config, averager, copy_how):
    """Averaging touches W_p, F_hat and the mean (floating buffers), never the counters or the schedule.

    Copying parameters and buffers back (Lightning's way) keeps the live head's counts; loading the
    averaged copy's whole state dict loads that copy's counts too, which agree with its schedule.
    """
    model = make_model(config)
    optimizer = sgd(model)
    average, update = AVERAGERS[averager](model)
    for step in range(4):
        train(model, optimizer, range(step, step + 1))
        update(model)
    assert_counters(model.prediction_head, 4, " and averaging")
    copy_back(average.module, model, copy_how)
    copied = 4 if copy_how == "params-and-buffers" else int(average.module.prediction_head.diagnostics()["num_steps"])
    assert_counters(model.prediction_head, copied, f" and copying the average back ({copy_how})")
    for step in range(4, 6):  # training goes on and keeps counting
        train(model, optimizer, range(step, step + 1))
        update(model)
    assert_counters(model.prediction_head, copied + 2, " (2 after the copy)")


@pytest.mark.parametrize("config", ["default", "trainable-freq2"])
def test_lightning_ema_weight_averaging_keeps_the_counters_of_the_live_head(config, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch import callbacks

    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip(f"lightning {pl.__version__} has no EMAWeightAveraging callback")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model(config)

        def training_step(self, batch, batch_idx):
            x0, x1 = batch
            z0, z1 = self.model.projector(x0), self.model.projector(x1)
            p0, p1 = self.model.prediction_head(z0), self.model.prediction_head(z1)
            return -(F.cosine_similarity(p0, z1.detach()).mean() + F.cosine_similarity(p1, z0.detach()).mean()) / 2

        def configure_optimizers(self):
            return sgd(self.model)

    pairs = [views(step) for step in range(4)]
    data = torch.utils.data.TensorDataset(torch.cat([x0 for x0, _ in pairs]), torch.cat([x1 for _, x1 in pairs]))
    module = Module()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callbacks.EMAWeightAveraging(decay=0.9)])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH))
    assert trainer.global_step == 4
    assert_counters(module.model.prediction_head, 4, " and on_train_end's copy of the average")
    train(module.model, sgd(module.model), range(4, 6))
    assert_counters(module.model.prediction_head, 6, " (2 after the copy)")


# ------------------------------------------------------------------------------ 5. export
def export_and_run(kind: str, model, example, x):
    if kind == "torch.export":
        return torch.export.export(model, (example,)).module()(x)
    if kind == "torch.jit.trace":
        return torch.jit.trace(model, example)(x)
    buffer = io.BytesIO()
    try:
        torch.onnx.export(model, (example,), buffer, dynamo=False)
    except torch.onnx.OnnxExporterError:
        if importlib.util.find_spec("onnx") is None:
            pytest.skip("the TorchScript ONNX exporter needs the onnx package, which is not installed")
        raise
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("the ONNX export ran; onnxruntime, needed to compare its output, is not installed")
    import onnxruntime

    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                            "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("kind", ["onnx", "torch.export", "torch.jit.trace"])
@pytest.mark.parametrize("config", CONFIGS)
def test_eval_model_exports_with_the_eager_output(config, kind):
    model = make_model(config)
    train(model, sgd(model), range(3))
    model.eval()
    example, x = torch.randn(4, IN_FEATURES), torch.randn(4, IN_FEATURES)  # exported at one, run at another
    with torch.no_grad():
        expected = model(x)
        got = export_and_run(kind, model, example, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- 6. leaf input
def test_leaf_input_does_not_accumulate_backward_hooks():
    """Views that are leaves (nn.Parameter) fed to the head directly, 2,000 training steps."""
    torch.manual_seed(0)
    head = DirectPredHead(4, calls_per_update="auto", freq=100)  # few refreshes: the test is about hooks
    v0, v1 = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.SGD([v0, v1], lr=0.01)
    steps = 2000
    for step in range(steps):
        loss = -(F.cosine_similarity(head(v0), v1.detach()).mean() + F.cosine_similarity(head(v1), v0.detach()).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hooks = max(len(v0._backward_hooks or {}), len(v1._backward_hooks or {}))
        assert hooks <= 2, f"{hooks} backward hooks on a leaf input after {step + 1} steps"
    assert_counters(head, steps)


# ------------------------------------------------------------- 7. however the model is built
def test_a_model_built_on_the_meta_device_trains_after_to_empty_and_reset():
    """Large models are built on the meta device and materialised with ``to_empty``; like
    BatchNorm, the head's state is then uninitialised until ``reset_running_stats()``."""
    with torch.device("meta"):
        model = make_model("center")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.projector.reset_parameters()
    model.prediction_head.reset_running_stats()
    head = model.prediction_head
    assert head.num_updates.device.type == "cpu" and head.corr.dtype == torch.float32
    optimizer = sgd(model)
    train(model, optimizer, range(3))
    assert_counters(head, 3)
    assert torch.isfinite(head.weight).all() and not torch.equal(head.weight, torch.eye(DIM))
