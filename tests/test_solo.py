"""solo-learn adapter (directpred_plugin.solo).

Option checks and the launcher's argument handling run everywhere. Everything else builds
and trains real solo-learn methods and skips when solo-learn is not importable; the YAML
and main_pretrain.py tests also need a solo-learn checkout (SOLO_LEARN_ROOT, or the folder
above an editable install of the `solo` package). The start-up hook has its own tests in
test_solo_autoregister.py.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import assert_same_state
from _helpers import snapshot as snapshot_state

import directpred_plugin.solo.install as install
from directpred_plugin import DirectPredHead
from directpred_plugin.variants import VARIANTS
from directpred_plugin.solo import (
    ISOLOSS_METHODS,
    METHOD_PREDICTORS,
    build_directpred,
    directpred_options,
    predictor_choices,
    register,
    unregister,
)
from directpred_plugin.solo.launcher import SCRIPT_ENV, UsageError, main, resolve_script
from _directpred_solo_autoregister import OPT_OUT_ENV

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

REPO = Path(__file__).resolve().parents[1]
INTEGRATION = REPO / "integrations" / "solo_learn"
SOLO_MISSING = (
    "solo-learn not installed: install it from source (git clone "
    "https://github.com/vturrisi/solo-learn), see integrations/solo_learn/README.md"
)
STEPS = 2
BATCH = 4


# ---------------------------------------------------------------- without solo-learn
def test_directpred_options_are_the_given_ones_and_the_head_applies_the_defaults():
    options = directpred_options({})
    assert options == {"calls_per_update": "auto"}  # what the cfg stores: nothing filled in
    head = build_directpred(8, options, calls_per_step=3)
    reference = DirectPredHead(8)
    for name in ("rho", "eps", "freq", "variant", "trainable", "center", "sync_dist", "stats_dtype"):
        assert getattr(head, name) == getattr(reference, name), name
    assert head.calls_per_update == "auto"  # one update per training step by default
    assert directpred_options({"freq": 3, "rho": 0.5}) == {"freq": 3, "rho": 0.5, "calls_per_update": "auto"}
    assert build_directpred(8, {"calls_per_update": 1}, calls_per_step=3).calls_per_update == 1
    # null: the calls per step that METHOD_PREDICTORS counts for the method
    assert build_directpred(8, {"calls_per_update": None}, calls_per_step=3).calls_per_update == 3
    assert build_directpred(8, {"stats_dtype": "float64"}, 2).corr.dtype == torch.float64
    assert directpred_options(options) == options  # solo may check a cfg twice


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rh": 0.3}, r"unknown option\(s\) \['rh'\]; valid options: \['rho'"),
        ({"rho": 1.5}, r"method_kwargs.directpred: rho must be a number in \[0, 1\)"),
        ({"freq": 0}, r"method_kwargs.directpred: freq must be an integer >= 1"),
        ({"variant": "mlp"}, r"method_kwargs.directpred: predictor 'directpred' is variant 'directpred', got "
                             r"variant='mlp'; name the member instead \(one of \['directpred', 'directpred-hybrid'"),
        ({"trainable": "yes"}, r"method_kwargs.directpred: trainable must be True or False"),
        ({"refresh_options": 3}, r"method_kwargs.directpred: refresh_options must be a dict"),
        ({"stats_dtype": "float16"}, r"stats_dtype must be one of \['float32', 'float64'\]"),
        ({"calls_per_update": 0}, r"calls_per_update must be an integer >= 1"),
    ],
)
def test_bad_directpred_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        directpred_options(options)


def test_predictor_choices_are_mlp_and_the_familys_names():
    choices = predictor_choices()
    assert choices.pop("mlp") is None  # solo-learn's own predictor
    assert list(choices) == list(VARIANTS)
    assert {"directpred", "directcopy", "ns", "directpred-hybrid"} <= set(choices)
    for name, defaults in choices.items():
        assert defaults == {**VARIANTS[name].defaults, "variant": name}
    assert {"byol", "simsiam", "nnbyol", "nnsiam"} <= set(METHOD_PREDICTORS)


def _recording_head(calls):
    """The head's class, recording what the adapter asks it for."""

    class Recording(DirectPredHead):
        def __init__(self, dim, variant, **options):
            calls.append((variant, options))
            super().__init__(dim, variant=variant, **options)

    return Recording


@pytest.mark.parametrize("predictor, given, built", [
    ("directpred", {}, ("directpred", {"calls_per_update": "auto"})),
    ("ns", {"freq": 3}, ("ns", {"freq": 3, "calls_per_update": "auto"})),
    ("directset", {"alpha": 0.25, "stats_dtype": "float64"},
     ("directset", {"alpha": 0.25, "stats_dtype": torch.float64, "calls_per_update": "auto"})),
    ("directpred-hybrid", {"variant": "directpred-hybrid", "freq": 3},
     ("directpred-hybrid", {"freq": 3, "calls_per_update": "auto"})),
    # the form configs used before every member was a choice: the member's name and defaults
    ("directpred", {"variant": "ns", "calls_per_update": None}, ("ns", {"calls_per_update": 3})),
])
def test_the_head_gets_only_the_options_the_config_gives(monkeypatch, predictor, given, built):
    calls = []
    monkeypatch.setattr(install, "DirectPredHead", _recording_head(calls))
    head = build_directpred(8, given, calls_per_step=3, predictor=predictor)
    assert calls[-1] == built
    name, options = built
    assert head.variant == name


def test_a_variant_that_contradicts_the_predictor_name_is_refused():
    with pytest.raises(ValueError, match=r"method_kwargs.directpred: predictor 'ns' is variant 'ns', got "
                                         r"variant='directpred'"):
        directpred_options({"variant": "directpred"}, "ns")
    with pytest.raises(ValueError, match=r"predictor 'mlp' takes no method_kwargs.directpred options"):
        directpred_options({}, "mlp")


def test_launcher_takes_the_script_from_the_arguments_or_the_environment(tmp_path):
    script = tmp_path / "main_pretrain.py"
    script.write_text("")
    args = ["--config-path", "cfgs", "--config-name", "byol.yaml"]
    assert resolve_script([str(script), *args], {}) == (str(script), args)
    # A DDP worker started by Lightning gets only the script's arguments (+ hydra's).
    worker_args = [*args, 'hydra.run.dir="."']
    assert resolve_script(worker_args, {SCRIPT_ENV: str(script)}) == (str(script), worker_args)
    # An explicit script wins over an inherited variable.
    assert resolve_script([str(script)], {SCRIPT_ENV: "/elsewhere.py"})[0] == str(script)
    with pytest.raises(UsageError, match="no such script"):
        resolve_script([str(tmp_path / "missing.py")], {})
    with pytest.raises(UsageError, match=r"expected a script \(SCRIPT.py\)"):
        resolve_script(args, {})


def test_launcher_usage(capsys, monkeypatch):
    monkeypatch.delenv(SCRIPT_ENV, raising=False)
    assert main(["--help"]) == 0
    assert "python -m directpred_plugin.solo SCRIPT.py" in capsys.readouterr().out
    assert main([]) == 2
    assert "expected a script" in capsys.readouterr().err


def test_import_does_not_need_solo_learn():
    code = "import sys, directpred_plugin.solo, directpred_plugin.solo.launcher; print(sys.modules.get('solo') is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_register_without_solo_learn_says_how_to_install(monkeypatch):
    for name in ("solo", "solo.methods", "solo.methods.base", "solo.utils.auto_resumer"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import solo...` fail
    with pytest.raises(ImportError, match="solo-learn, installed from source.*--no-build-isolation"):
        register()


def test_integration_configs_select_directpred_with_valid_options():
    for name in ("byol", "simsiam"):
        cfg = yaml.safe_load((INTEGRATION / f"{name}.yaml").read_text())
        assert cfg["method"] in METHOD_PREDICTORS
        kwargs = cfg["method_kwargs"]
        assert kwargs["predictor"] == "directpred"
        assert directpred_options(kwargs["directpred"])["variant"] == "directpred"


# ------------------------------------------------------------------- with solo-learn
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: one thread is faster, and far faster on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def methods():
    pytest.importorskip("solo.methods", reason=SOLO_MISSING)
    register()
    from solo.methods import METHODS

    return METHODS


@pytest.fixture(scope="module")
def solo_root(methods):
    root = os.environ.get("SOLO_LEARN_ROOT")
    if root is None:
        import solo

        root = Path(solo.__file__).resolve().parents[1]  # an editable install's checkout
    root = Path(root)
    if not (root / "main_pretrain.py").is_file():
        pytest.skip("solo-learn checkout not found: set SOLO_LEARN_ROOT to the folder with main_pretrain.py")
    return root


def make_cfg(method, *, optimizer="lars", num_small_crops=0, **method_kwargs):
    from omegaconf import OmegaConf

    kwargs = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32}
    if method in ("nnbyol", "nnsiam", "nnclr", "all4one"):
        kwargs["queue_size"] = 64
    if method in ("nnclr", "mocov3", "all4one"):
        kwargs["temperature"] = 0.2
    if method == "vicreg":
        kwargs.update(sim_loss_weight=25.0, var_loss_weight=25.0, cov_loss_weight=1.0)
    kwargs.update(method_kwargs)
    optimizer_kwargs = {"lars": {"momentum": 0.9, "eta": 0.02, "clip_lr": True, "exclude_bias_n_norm": True},
                        "sgd": {"momentum": 0.9}, "adamw": {}}[optimizer]
    cfg = {
        "name": "test", "method": method, "backbone": {"name": "resnet18"},
        "method_kwargs": kwargs,
        "momentum": {"base_tau": 0.99, "final_tau": 1.0},
        "data": {"dataset": "custom", "train_path": ".", "val_path": ".", "format": "image_folder",
                 "num_workers": 0, "num_large_crops": 2, "num_small_crops": num_small_crops, "num_classes": 4},
        "optimizer": {"name": optimizer, "batch_size": BATCH, "lr": 0.3, "classifier_lr": 0.1,
                      "weight_decay": 1e-5, "kwargs": optimizer_kwargs},
        "scheduler": {"name": "warmup_cosine", "warmup_epochs": 0},
        "checkpoint": {"enabled": False}, "auto_resume": {"enabled": False},
        "max_epochs": 1, "devices": 1, "accelerator": "cpu", "num_nodes": 1,
        "performance": {"disable_channel_last": True},  # main_pretrain would convert the model
    }
    cfg = OmegaConf.create(cfg)
    OmegaConf.set_struct(cfg, False)
    return cfg


def dataloaders(cfg):
    """solo-learn's own crop pipeline over random 32x32 images (as its method tests do)."""
    from solo.data.pretrain_dataloader import (
        FullTransformPipeline, NCropAugmentation, build_transform_pipeline, dataset_with_index, prepare_dataloader,
    )
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import FakeData

    def crops(size, n):
        aug = OmegaConf.create({
            "crop_size": size, "rrc": {"enabled": True, "crop_min_scale": 0.3, "crop_max_scale": 1.0},
            "color_jitter": {"prob": 0.0}, "grayscale": {"prob": 0.0}, "gaussian_blur": {"prob": 0.0},
            "solarization": {"prob": 0.0}, "equalization": {"prob": 0.0}, "horizontal_flip": {"prob": 0.5},
        })
        return NCropAugmentation(build_transform_pipeline("custom", aug), n)

    pipelines = [crops(32, cfg.data.num_large_crops)]
    if cfg.data.num_small_crops:
        pipelines.append(crops(16, cfg.data.num_small_crops))
    train = dataset_with_index(FakeData)(size=BATCH * STEPS * 2, image_size=(3, 32, 32), num_classes=4,
                                         transform=FullTransformPipeline(pipelines))
    val = FakeData(size=BATCH, image_size=(3, 32, 32), num_classes=4, transform=transforms.ToTensor())
    return prepare_dataloader(train, batch_size=BATCH, num_workers=0), DataLoader(val, batch_size=BATCH)


def fit(model, *, steps=STEPS, epochs=1, ckpt_path=None, callbacks=(), precision="32-true", accumulate=1,
        **trainer_options):
    from lightning.pytorch import Trainer

    options = dict(
        accelerator="cpu", devices=1, precision=precision, max_epochs=epochs, limit_train_batches=steps, limit_val_batches=1,
        num_sanity_val_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), accumulate_grad_batches=accumulate,
    )
    trainer = Trainer(**{**options, **trainer_options})
    train, val = dataloaders(model.cfg)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer


def group_sizes(model):
    return [(group.get("name"), len(list(group["params"]))) for group in model.learnable_params]


@contextlib.contextmanager
def unregistered():
    unregister()
    try:
        yield
    finally:
        register()


@pytest.mark.parametrize("method", sorted(METHOD_PREDICTORS) + ["vicreg"])
def test_without_the_key_the_model_is_solo_learns_own(methods, method):
    import solo.methods

    cfg_ours, cfg_solo = make_cfg(method), make_cfg(method)
    torch.manual_seed(0)
    ours = methods[method](cfg_ours)
    with unregistered():
        torch.manual_seed(0)
        theirs = methods[method](cfg_solo)
        assert methods[method].__init__.__module__.startswith("solo.methods")  # solo-learn's own code
    # patched in place: METHODS still holds solo-learn's own classes
    assert type(ours) is type(theirs) is getattr(solo.methods, type(ours).__name__)
    assert cfg_ours == cfg_solo and "predictor" not in cfg_ours.method_kwargs
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    assert [name for name, _ in ours.named_modules()] == [name for name, _ in theirs.named_modules()]
    assert group_sizes(ours) == group_sizes(theirs)
    x = torch.randn(BATCH, 3, 32, 32)
    out_ours, out_theirs = ours.eval()(x), theirs.eval()(x)
    for key in ("p", "q", "z"):
        if key in out_theirs:
            assert torch.equal(out_ours[key], out_theirs[key])


def test_choices_are_checked_when_solo_checks_the_cfg(methods):
    with pytest.raises(ValueError, match=r"method_kwargs.predictor must be one of \['directcopy', 'directpred', "
                                         r"'directpred-hybrid', .*'mlp', .*\], got 'direct'"):
        methods["byol"](make_cfg("byol", predictor="direct"))
    with pytest.raises(ValueError, match=r"method 'vicreg' has no predictor.*methods with a predictor: \['all4one', 'byol'"):
        methods["vicreg"](make_cfg("vicreg", predictor="directpred"))
    with pytest.raises(ValueError, match=r"method_kwargs.directpred: rho must be"):
        methods["simsiam"](make_cfg("simsiam", predictor="directpred", directpred={"rho": 2.0}))
    with pytest.raises(ValueError, match=r"method_kwargs.directpred must be a mapping of options, got 3"):
        methods["byol"](make_cfg("byol", predictor="directpred", directpred=3))
    # solo-learn's own check on a built model's cfg accepts the filled-in options again
    model = methods["byol"](make_cfg("byol", predictor="directpred", directpred={"freq": 3}))
    assert model.add_and_assert_specific_cfg(model.cfg).method_kwargs.directpred == {"freq": 3, "calls_per_update": "auto"}
    assert model.predictor.freq == 3 and isinstance(model.predictor, DirectPredHead)


def _build_ways(methods):
    """Every way solo-learn code builds a BYOL: its registry, its classes, a user's subclasses."""
    import solo.methods
    import solo.methods.byol

    class UserBYOL(solo.methods.byol.BYOL):  # inherits everything
        pass

    class UserBYOLWithInit(solo.methods.BYOL):  # its own __init__ and cfg check, calling solo's
        def __init__(self, cfg):
            super().__init__(cfg)
            self.user_attribute = True

        @staticmethod
        def add_and_assert_specific_cfg(cfg):
            return super(UserBYOLWithInit, UserBYOLWithInit).add_and_assert_specific_cfg(cfg)

    return {"METHODS": methods["byol"], "solo.methods.BYOL": solo.methods.BYOL,
            "solo.methods.byol.BYOL": solo.methods.byol.BYOL, "subclass": UserBYOL,
            "subclass-with-init": UserBYOLWithInit}


@pytest.mark.parametrize("way", ["METHODS", "solo.methods.BYOL", "solo.methods.byol.BYOL", "subclass",
                                 "subclass-with-init"])
def test_every_way_of_building_a_method_honours_the_key(methods, way):
    cls = _build_ways(methods)[way]
    model = cls(make_cfg("byol", predictor="directcopy", directpred={"freq": 2}))
    assert isinstance(model.predictor, DirectPredHead)
    assert (model.predictor.variant, model.predictor.freq) == ("directcopy", 2)
    assert model.solo_method == "byol" and model.replaced_predictors == ["predictor"]
    assert all(group["params"] for group in model.learnable_params)  # the empty head group dropped
    with pytest.raises(ValueError, match=r"method_kwargs.predictor must be one of .*got 'direct'"):
        cls(make_cfg("byol", predictor="direct"))
    with pytest.raises(ValueError, match=r"method_kwargs.loss: isoloss cannot train a trainable head"):
        cls(make_cfg("byol", predictor="directpred-hybrid", loss="isoloss"))
    mlp = cls(make_cfg("byol"))
    assert isinstance(mlp.predictor, torch.nn.Sequential) and mlp.replaced_predictors == []


def test_register_patches_in_place_once_and_keeps_the_originals(methods):
    import solo.methods.byol
    from solo.methods.base import BaseMethod

    byol = solo.methods.byol.BYOL
    patched = {name: byol.__dict__[name] for name in ("__init__", "training_step", "add_and_assert_specific_cfg")}
    register()  # again: nothing changes
    assert all(byol.__dict__[name] is value for name, value in patched.items())
    assert methods["byol"] is byol
    # the originals are reachable, and they are solo-learn's code
    assert byol.__init__.__wrapped__.__module__ == "solo.methods.byol"
    assert byol.add_and_assert_specific_cfg.__wrapped__.__qualname__ == "BYOL.add_and_assert_specific_cfg"
    assert byol.learnable_params.fget.__wrapped__.__module__ == "solo.methods.byol"
    # BaseMethod is registered too; its own check runs inside BYOL's and adds nothing
    assert BaseMethod.__init__.__module__ == "directpred_plugin.solo.registration"
    with unregistered():
        assert byol.__init__ is patched["__init__"].__wrapped__
        model = byol(make_cfg("byol", predictor="directpred"))  # unregistered: solo-learn ignores the key
        assert isinstance(model.predictor, torch.nn.Sequential)
    assert byol.__dict__["__init__"] is not patched["__init__"].__wrapped__


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_predictor_name_builds_the_head_its_variant_builds(methods, name):
    from test_variants import head_options

    model = methods["byol"](make_cfg("byol", predictor=name))
    assert type(model.predictor) is DirectPredHead
    assert head_options(model.predictor) == head_options(DirectPredHead(16, variant=name))
    assert model.predictor.calls_per_update == "auto"


@pytest.mark.parametrize("kwargs", [
    dict(predictor="directpred-hybrid"),
    dict(predictor="directpred", directpred={"trainable": True, "freq": 2}),
    dict(predictor="directpred", directpred={"variant": "directpred-hybrid"}),
])
def test_isoloss_with_a_trainable_head_is_refused_before_any_module_is_built(methods, kwargs):
    cfg = make_cfg("byol", loss="isoloss", **kwargs)
    with pytest.raises(ValueError, match=r"isoloss cannot train a trainable head .*W_p would get no gradient"):
        methods["byol"].add_and_assert_specific_cfg(cfg)


def test_the_cfg_stores_only_the_given_options(methods):
    cfg = make_cfg("byol", predictor="ns", directpred={"freq": 2})
    model = methods["byol"](cfg)
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(cfg.method_kwargs.directpred) == {"freq": 2, "calls_per_update": "auto"}
    # the name's defaults reach the head without being written into the cfg
    assert (model.predictor.rho, model.predictor.eps, model.predictor.freq) == (0.0, 0.0, 2)


FIT_CASES = {
    "byol-multicrop": dict(method="byol", num_small_crops=2),
    "simsiam-sgd-bf16": dict(method="simsiam", optimizer="sgd", precision="bf16-mixed"),
    "nnbyol-trainable-adamw": dict(method="nnbyol", optimizer="adamw", directpred={"trainable": True, "freq": 2}),
    "nnsiam": dict(method="nnsiam"),
    "nnclr": dict(method="nnclr"),
    "mocov3": dict(method="mocov3"),
    "all4one": dict(method="all4one"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_through_solo_learn_trains_the_directpred_head(methods, case):
    from solo.utils.lars import LARS

    spec = dict(FIT_CASES[case])
    method, precision = spec.pop("method"), spec.pop("precision", "32-true")
    cfg = make_cfg(method, predictor="directpred", **spec)
    model = methods[method](cfg)
    heads = {attr: getattr(model, attr) for attr in METHOD_PREDICTORS[method]}
    assert all(isinstance(head, DirectPredHead) for head in heads.values())
    trainable = cfg.method_kwargs.directpred.get("trainable", False)
    before = {attr: head.weight.detach().clone() for attr, head in heads.items()}
    calls = {attr: [] for attr in heads}  # training-mode calls of each head, per step
    for attr, head in heads.items():
        head.register_forward_pre_hook(
            lambda module, args, seen=calls[attr]: seen.append(module.steps.steps)
            if module.training and torch.is_grad_enabled() else None)

    trainer = fit(model, precision=precision)

    optimizer = trainer.optimizers[0]
    if cfg.optimizer.name == "lars":
        assert isinstance(optimizer, LARS)
    assert all(group["params"] for group in optimizer.param_groups)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for attr, head in heads.items():
        assert getattr(model, attr) is head
        # one update per training step: every view of a step pooled, validation changes
        # nothing; with "auto" each step's pool is folded by its backward pass
        assert head.calls_per_update == "auto"
        assert int(head.num_updates) == STEPS, attr
        assert head.steps.calls == 0, attr
        assert calls[attr].count(STEPS - 1) == METHOD_PREDICTORS[method][attr](model), attr  # the last step's
        assert not torch.allclose(head.weight, before[attr]), attr
        assert torch.isfinite(head.weight).all()
        assert (id(head.weight) in in_optimizer) == trainable


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method, options", [("byol", {}), ("simsiam", {"trainable": True, "freq": 2})],
                         ids=["byol", "simsiam-trainable"])
def test_gradient_accumulation_through_solo_learn_makes_one_update_per_optimizer_step(methods, method, options):
    """``accumulate_grad_batches=2``: the two batches of an optimizer step, every view of each,
    pool into one update (F_hat equals one fold of their projections) and W_p is the same for all."""
    model = methods[method](make_cfg(method, predictor="directpred", directpred=options))
    head = model.predictor
    seen = []  # per training call: (optimizer steps so far, the call's input, the W_p it used)
    head.register_forward_hook(lambda module, args, out: seen.append(
        (model.trainer.global_step, args[0].detach().double(), module.weight.detach().clone()))
        if module.training and torch.is_grad_enabled() else None)
    trainer = fit(model, steps=4, accumulate=2)
    assert trainer.global_step == 2
    assert int(head.num_updates) == head.steps.steps == 2 and head.steps.calls == 0
    reference = DirectPredHead(16, stats_dtype=torch.float64)
    for step in range(2):
        calls = [(z, weight) for count, z, weight in seen if count == step]
        assert len(calls) == 4  # two batches, two views each
        assert all(torch.equal(weight, calls[0][1]) for _, weight in calls)  # one W_p for the whole window
        reference.update(torch.cat([z for z, _ in calls]))
    torch.testing.assert_close(head.corr.double(), reference.corr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer, trainable, split_weight_decay",
    [("lars", False, False), ("lars", True, True), ("sgd", True, False), ("adamw", False, True)],
)
def test_param_groups_stay_valid_for_solos_optimizers(methods, optimizer, trainable, split_weight_decay):
    # a trainable W_p needs freq > 1; freq=2 either way, so the first step's end refreshes nothing and
    # only the optimizer can have moved W_p
    options = {"trainable": True, "freq": 2} if trainable else {"freq": 2}
    cfg = make_cfg("simsiam", optimizer=optimizer, predictor="directpred", directpred=options)
    cfg.optimizer.exclude_bias_n_norm_wd = split_weight_decay
    cfg.scheduler.name = "none"  # configure_optimizers then needs no Trainer
    model = methods["simsiam"](cfg)
    opt = model.configure_optimizers()
    names = [group.get("name") for group in opt.param_groups]
    assert all(group["params"] for group in opt.param_groups)
    assert ("predictor" in names) == trainable
    if trainable:
        (group,) = [g for g in opt.param_groups if g.get("name") == "predictor"]
        assert group["params"] == [model.predictor.weight]
        # W_p is a matrix: it keeps its weight decay, and LARS adapts its step
        assert group["weight_decay"] == cfg.optimizer.weight_decay
    x = torch.randn(BATCH, 3, 32, 32)
    out1, out2 = model(x), model(x.flip(-1))
    loss = -torch.nn.functional.cosine_similarity(out1["p"], out2["z"].detach()).mean()
    loss.backward()
    weight = model.predictor.weight.detach().clone()
    opt.step()
    assert torch.isfinite(model.predictor.weight).all()
    assert (not torch.equal(model.predictor.weight, weight)) == trainable
    opt.load_state_dict(opt.state_dict())


@pytest.mark.timeout(300)
def test_resume_restores_the_head_and_refuses_another_predictor(methods, tmp_path):
    from lightning.pytorch.callbacks import Callback

    model = methods["byol"](make_cfg("byol", predictor="directpred"))
    trainer = fit(model)
    ckpt = tmp_path / "byol.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = snapshot_state(model.predictor)
    # one update per step, each folded at its optimizer step: nothing is left open to save
    assert (int(model.predictor.num_updates), model.predictor.steps.calls) == (STEPS, 0)

    class Snapshot(Callback):
        def on_train_start(self, trainer, module):
            self.state = snapshot_state(module.predictor)
            self.counter = int(module.predictor.diagnostics()["num_steps"])

    resumed = methods["byol"](make_cfg("byol", predictor="directpred"))
    snapshot = Snapshot()
    fit(resumed, epochs=2, ckpt_path=ckpt, callbacks=[snapshot])
    assert snapshot.state.keys() == saved.keys()
    assert_same_state(snapshot.state, saved)
    assert snapshot.counter == STEPS
    assert int(resumed.predictor.num_updates) == 2 * STEPS

    mlp = methods["byol"](make_cfg("byol"))
    with pytest.raises(RuntimeError, match=r"checkpoint's predictor is a DirectPred head.*builds solo-learn's MLP"):
        fit(mlp, epochs=2, ckpt_path=ckpt)
    with pytest.raises(RuntimeError, match=r"checkpoint's predictor is solo-learn's MLP.*builds a DirectPred head"):
        model.on_load_checkpoint({"state_dict": mlp.state_dict()})


def test_auto_resume_never_picks_a_checkpoint_of_another_predictor(methods, tmp_path):
    from omegaconf import OmegaConf
    from solo.utils.auto_resumer import AutoResumer

    mlp_cfg = make_cfg("byol")
    methods["byol"](mlp_cfg)  # fills solo's defaults, as main_pretrain does
    run = tmp_path / "byol" / "0"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(OmegaConf.to_container(mlp_cfg)))
    (run / "byol-0-ep=0.ckpt").write_bytes(b"")
    resumer = AutoResumer(checkpoint_dir=tmp_path / "byol", max_hours=1)

    for kwargs, found in [({}, run / "byol-0-ep=0.ckpt"), ({"predictor": "directpred"}, None)]:
        cfg = make_cfg("byol", **kwargs)
        methods["byol"](cfg)
        assert resumer.find_checkpoint(cfg)[0] == found


def test_auto_resume_compares_the_head_options_but_not_the_logging_interval(methods, tmp_path):
    from omegaconf import OmegaConf
    from solo.utils.auto_resumer import AutoResumer

    saved = make_cfg("byol", predictor="directpred", directpred={"freq": 2, "log_every_n_steps": 10})
    methods["byol"](saved)
    run = tmp_path / "byol" / "0"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(OmegaConf.to_container(saved)))
    (run / "byol-0-ep=0.ckpt").write_bytes(b"")
    resumer = AutoResumer(checkpoint_dir=tmp_path / "byol", max_hours=1)
    for options, found in [({"freq": 2}, run / "byol-0-ep=0.ckpt"), ({"freq": 2, "log_every_n_steps": 0}, run / "byol-0-ep=0.ckpt"),
                           ({"freq": 3, "log_every_n_steps": 10}, None), ({}, None)]:
        cfg = make_cfg("byol", predictor="directpred", directpred=options)
        methods["byol"](cfg)
        assert resumer.find_checkpoint(cfg)[0] == found, options


def test_models_pickle_for_ddp_spawn(methods):
    model = methods["byol"](make_cfg("byol", predictor="directpred", loss="isoloss"))
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is methods["byol"] and isinstance(copy.predictor, DirectPredHead)
    assert copy.isoloss is not None and copy.isoloss.head is copy.predictor
    # A fresh interpreter (as a spawned worker) with the start-up hook off: loading the model
    # registers, so its training step still uses IsoLoss rather than solo-learn's loss.
    code = ("import pickle, sys; m = pickle.load(sys.stdin.buffer); "
            "print(type(m).__name__, type(m.predictor).__name__, type(m).training_step.__module__)")
    env = {**os.environ, OPT_OUT_ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(model), capture_output=True, check=True,
                         env=env)
    assert out.stdout.decode().split() == ["BYOL", "DirectPredHead", "directpred_plugin.solo.registration"]


def _strip_directpred_lines(text):
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)  # our header
    return "".join(line for line in lines if "# DirectPred" not in line)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_integration_configs_are_solos_plus_the_predictor_lines(solo_root, name):
    from omegaconf import OmegaConf

    ours = (INTEGRATION / f"{name}.yaml").read_text()
    shipped = (solo_root / "scripts" / "pretrain" / "cifar" / f"{name}.yaml").read_text()
    assert _strip_directpred_lines(ours) == shipped
    ours_cfg, shipped_cfg = OmegaConf.create(ours), OmegaConf.create(shipped)
    assert ours_cfg.method_kwargs.pop("predictor") == "directpred"
    ours_cfg.method_kwargs.pop("directpred")
    assert ours_cfg == shipped_cfg


@pytest.mark.parametrize("name, width", [("byol", 256), ("simsiam", 2048)])
def test_integration_configs_compose_with_solos_config_groups(solo_root, methods, name, width):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from solo.args.pretrain import parse_cfg

    search = f"hydra.searchpath=[file://{solo_root / 'scripts' / 'pretrain' / 'cifar'}]"
    with initialize_config_dir(config_dir=str(INTEGRATION), version_base="1.2"):
        cfg = compose(config_name=f"{name}.yaml", overrides=[search, "++wandb.enabled=False"])
    OmegaConf.set_struct(cfg, False)
    cfg = parse_cfg(cfg)
    assert cfg.data.num_large_crops == 2
    model = methods[cfg.method](cfg)
    assert isinstance(model.predictor, DirectPredHead) and model.predictor.dim == width
    assert model.predictor.calls_per_update == "auto"


MAIN_PRETRAIN_RUNS = {
    # solo-learn's own command, the YAML key alone: the start-up hook registers in both ranks
    "byol-ddp": dict(method="byol", devices=2, launcher=False),
    "simsiam": dict(method="simsiam", devices=1, launcher=False),
    # the launcher, for those who prefer it, works without the hook
    "simsiam-launcher-no-hook": dict(method="simsiam", devices=1, launcher=True),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run_name", list(MAIN_PRETRAIN_RUNS))
def test_main_pretrain_builds_directpred_from_the_yaml_key(solo_root, tmp_path, run_name):
    """solo-learn's unmodified main_pretrain.py with our YAML, in a fresh interpreter (and under
    Lightning DDP on 2 CPU processes); nothing imports directpred_plugin explicitly."""
    from PIL import Image

    run = MAIN_PRETRAIN_RUNS[run_name]
    method, devices = run["method"], run["devices"]
    gen = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        for i in range(8):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    launcher = [sys.executable, "-m", "directpred_plugin.solo"] if run["launcher"] else [sys.executable]
    command = [
        *launcher, str(solo_root / "main_pretrain.py"),
        "--config-path", str(INTEGRATION), "--config-name", f"{method}.yaml",
        f"hydra.searchpath=[file://{solo_root / 'scripts' / 'pretrain' / 'cifar'}]",
        "data.dataset=custom", f"data.train_path={tmp_path / 'train'}", "data.val_path=null",
        "data.num_workers=0", "accelerator=cpu", f'devices="{devices}"',
        f"strategy={'ddp' if devices > 1 else 'auto'}", "sync_batchnorm=False",
        "precision=32", "max_epochs=1", f"optimizer.batch_size={BATCH}", f"++limit_train_batches={STEPS}",
        "method_kwargs.proj_hidden_dim=64", "method_kwargs.pred_hidden_dim=64", "method_kwargs.proj_output_dim=32",
        "++wandb.enabled=False", "++auto_resume.enabled=False", f"checkpoint.dir={tmp_path / 'ckpt'}",
        # the heads' diagnostics at every step, written by the Trainer at every step
        "++method_kwargs.directpred.log_every_n_steps=1", "++log_every_n_steps=1",
    ]
    env = {k: v for k, v in os.environ.items() if k not in (SCRIPT_ENV, "LOCAL_RANK", OPT_OUT_ENV)}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    if run["launcher"]:
        env[OPT_OUT_ENV] = "0"
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-4000:]

    built = [line for line in result.stderr.splitlines() if f"{method}.predictor = DirectPredHead(dim=32" in line]
    assert len(built) == devices, result.stderr[-4000:]
    if devices > 1:
        assert any("LOCAL_RANK 1" in line for line in built)
    registered = [line for line in result.stderr.splitlines() if "DirectPred registered with solo-learn" in line]
    assert len(registered) == (devices if run["launcher"] else 0)

    (ckpt,) = (tmp_path / "ckpt" / method).glob("*/*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("predictor.0.") for k in state)  # no MLP
    # all-reduced statistics, one update per step, each folded at its optimizer step
    saved = DirectPredHead(32)
    saved.load_state_dict({k.removeprefix("predictor."): v for k, v in state.items() if k.startswith("predictor.")})
    assert (int(saved.num_updates), saved.steps.calls) == (STEPS, 0)
    assert not torch.equal(state["predictor.weight"], torch.eye(32))
    args = json.loads(next((tmp_path / "ckpt" / method).glob("*/args.json")).read_text())
    assert args["method_kwargs"]["predictor"] == "directpred"
    # Without wandb, main_pretrain leaves the Trainer its default logger: CSV where TensorBoard is absent.
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        (metrics,) = (tmp_path / "lightning_logs").glob("*/metrics.csv")
        with open(metrics, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("directpred/predictor/rankme")]
        assert [float(row["directpred/predictor/num_updates"]) for row in rows] == [1.0, 2.0]
        assert all(float(row["directpred/predictor/alignment"]) == pytest.approx(1.0, abs=1e-6) for row in rows)


# ------------------------------------------------------------------------------ IsoLoss
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method, form", [("byol", "cosine"), ("simsiam", "l2")])
def test_isoloss_trains_through_solo_learn(methods, method, form):
    import importlib

    cfg = make_cfg(method, predictor="directpred", loss="isoloss", isoloss={"form": form})
    model = methods[method](cfg)
    assert model.isoloss is not None and model.isoloss.form == form
    module_name, name, _, _ = ISOLOSS_METHODS[method]
    original = getattr(importlib.import_module(module_name), name)
    calls = []
    model.isoloss.register_forward_hook(lambda module, args, out: calls.append(float(out.detach())))
    fit(model)
    # every prediction loss of every step went through IsoLoss, and solo's function is back
    assert len(calls) == STEPS * 2 and all(np.isfinite(calls))
    assert getattr(importlib.import_module(module_name), name) is original
    assert model._isoloss_step.pending == 0
    assert int(model.predictor.num_updates) == STEPS


@pytest.mark.parametrize("overrides, message", [
    ({"loss": "bogus"}, r"method_kwargs.loss must be one of \['default', 'isoloss'\]"),
    ({"loss": "isoloss", "isoloss": {"form": "dot"}}, "form must be cosine or l2"),
    ({"isoloss": {"form": "l2"}}, "method_kwargs.loss is not isoloss"),
])
def test_isoloss_config_errors_are_named(methods, overrides, message):
    cfg = make_cfg("byol", predictor="directpred", **overrides)
    with pytest.raises(ValueError, match=message):
        methods["byol"].add_and_assert_specific_cfg(cfg)


def test_isoloss_needs_a_closed_form_predictor(methods):
    with pytest.raises(ValueError, match="needs a closed-form predictor"):
        methods["byol"].add_and_assert_specific_cfg(make_cfg("byol", loss="isoloss"))
    with pytest.raises(ValueError, match="is available for"):
        methods["mocov3"].add_and_assert_specific_cfg(make_cfg("mocov3", predictor="directpred", loss="isoloss"))


@pytest.mark.parametrize("calls_per_update, shown", [(2, "2"), (None, "null")])
def test_cosine_isoloss_with_an_integer_calls_per_update_is_refused_naming_auto(methods, calls_per_update, shown):
    cfg = make_cfg("byol", predictor="directpred", loss="isoloss", directpred={"calls_per_update": calls_per_update})
    with pytest.raises(ValueError, match=rf"isoloss \(form cosine\) needs method_kwargs.directpred.calls_per_update: "
                                         rf"auto \(the default\), got {shown}: .*set it to auto"):
        methods["byol"].add_and_assert_specific_cfg(cfg)
    # the l2 form hands the gradient at p to z without reading W_p, so the step's W_p is the prediction's
    cfg = make_cfg("byol", predictor="directpred", loss="isoloss", isoloss={"form": "l2"},
                   directpred={"calls_per_update": calls_per_update})
    assert methods["byol"].add_and_assert_specific_cfg(cfg).method_kwargs.isoloss == {"form": "l2"}


@pytest.mark.timeout(300)
def test_isoloss_replaces_the_loss_of_its_own_model_only(methods):
    """While an IsoLoss model trains, solo-learn's loss function is untouched: a second, MLP-predictor
    model stepped in the middle of that training step gets solo-learn's own loss."""
    import solo.methods.byol

    solo_loss = solo.methods.byol.byol_loss_func
    isoloss_model = methods["byol"](make_cfg("byol", predictor="directpred", loss="isoloss"))
    mlp_model = methods["byol"](make_cfg("byol"))
    batch = next(iter(dataloaders(mlp_model.cfg)[0]))
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached to the MLP model
        expected = float(mlp_model.training_step(batch, 0).detach())
    inside = []

    def step_the_other_model(module, args, output):
        if module.training and torch.is_grad_enabled() and not inside:
            with pytest.warns(UserWarning, match="self.log"):
                inside.append((solo.methods.byol.byol_loss_func is solo_loss, float(mlp_model.training_step(batch, 0).detach())))

    isoloss_model.predictor.register_forward_hook(step_the_other_model)
    losses = []
    isoloss_model.isoloss.register_forward_hook(lambda module, args, out: losses.append(float(out.detach())))
    fit(isoloss_model)
    assert inside == [(True, pytest.approx(expected, rel=1e-6))]
    assert len(losses) == STEPS * 2  # the IsoLoss model itself trained with IsoLoss
    assert solo.methods.byol.byol_loss_func is solo_loss


@pytest.mark.parametrize("kwargs, key, meant", [
    ({"predictor": "directpred", "direct_pred": {"rho": 0.9}}, "direct_pred", "directpred"),
    ({"predictor": "directpred", "directpred_options": {"rho": 0.9}}, "directpred_options", "directpred"),
    ({"predictor": "ns", "ns": {"freq": 2}}, "ns", "directpred"),
    ({"predicter": "directpred"}, "predicter", "predictor"),
    ({"predictor": "directpred", "loss": "isoloss", "iso_loss": {"form": "l2"}}, "iso_loss", "isoloss"),
])
def test_a_key_that_looks_like_the_adapters_stops_the_run_naming_it(methods, kwargs, key, meant):
    with pytest.raises(ValueError, match=rf"method_kwargs\.{key} is read by neither solo-learn nor directpred-plugin, "
                                         rf"and looks like method_kwargs\.{meant}: .*Rename it to {meant}"):
        methods["byol"](make_cfg("byol", **kwargs))
    with pytest.raises(ValueError, match=rf"method_kwargs\.{key} is read by neither"):  # also beside a method's MLP
        methods["vicreg"](make_cfg("vicreg", **{key: kwargs[key]}))


def test_no_key_of_solo_learn_looks_like_the_adapters(solo_root):
    import re

    from directpred_plugin.solo.lookalikes import meant_key

    keys = set()
    for path in (solo_root / "scripts").rglob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        if isinstance(config, dict) and isinstance(config.get("method_kwargs"), dict):
            keys.update(config["method_kwargs"])
    for path in (solo_root / "solo").rglob("*.py"):
        keys.update(re.findall(r"method_kwargs\.(\w+)", path.read_text()))
    assert len(keys) > 30 and "pred_hidden_dim" in keys
    assert {key: meant_key(key) for key in keys if meant_key(key)} == {}


def test_the_cfg_check_builds_no_module_and_a_model_builds_each_head_once(methods, monkeypatch):
    import functools

    built = []
    original = DirectPredHead.__init__

    @functools.wraps(original)
    def counting(self, dim, **options):
        built.append(dim)
        original(self, dim, **options)

    monkeypatch.setattr(DirectPredHead, "__init__", counting)
    cfg = make_cfg("byol", predictor="directpred", directpred={"freq": 2, "stats_dtype": "float64"}, loss="isoloss")
    methods["byol"].add_and_assert_specific_cfg(cfg)
    assert built == []
    methods["byol"](cfg)
    assert built == [16]
    methods["all4one"](make_cfg("all4one", predictor="ns"))
    assert built == [16, 16, 16]
    assert directpred_options({"freq": 2}) and built == [16, 16, 16]


def test_the_logging_interval_is_an_option_of_the_directpred_block(methods):
    model = methods["simsiam"](make_cfg("simsiam", predictor="directpred"))
    assert model._directpred_diagnostics.every_n_steps == 50  # the default, Lightning's own interval
    assert "log_every_n_steps" not in model.cfg.method_kwargs.directpred  # defaults are not written into the cfg
    with pytest.raises(ValueError, match=r"method_kwargs.directpred: log_every_n_steps must be an integer >= 0"):
        methods["simsiam"](make_cfg("simsiam", predictor="directpred", directpred={"log_every_n_steps": -1}))
    head = build_directpred(8, {"log_every_n_steps": 5}, calls_per_step=2)
    assert isinstance(head, DirectPredHead)  # the logging option is not the head's


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["byol", "all4one"])
def test_the_methods_own_logger_shows_rankme_and_alignment(methods, tmp_path, method):
    from lightning.pytorch.loggers import CSVLogger

    model = methods[method](make_cfg(method, predictor="directpred", directpred={"log_every_n_steps": 2}))
    logger = CSVLogger(tmp_path, name="run")
    fit(model, steps=4, logger=logger, log_every_n_steps=2)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("directpred/predictor/rankme")]
    # written with solo-learn's own step metrics (Lightning labels a step's row with the steps before it)
    assert [int(row["step"]) for row in rows] == [1, 3]
    assert all(row["train_neg_cos_sim_step" if method == "byol" else "train_nnclr_loss_step"] for row in rows)
    assert [float(row["directpred/predictor/num_updates"]) for row in rows] == [2.0, 4.0]
    for row in rows:
        assert float(row["directpred/predictor/alignment"]) == pytest.approx(1.0, abs=1e-6)
        assert 1.0 <= float(row["directpred/predictor/rankme"]) <= 16
        if method == "all4one":
            assert 1.0 <= float(row["directpred/predictor2/rankme"]) <= 16
    assert float(rows[-1]["directpred/predictor/rankme"]) == pytest.approx(model.predictor.diagnostics()["rankme"])


@pytest.mark.timeout(300)
def test_a_zero_logging_interval_logs_nothing(methods, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = methods["simsiam"](make_cfg("simsiam", predictor="directpred", directpred={"log_every_n_steps": 0}))
    logger = CSVLogger(tmp_path, name="run")
    fit(model, steps=2, logger=logger, log_every_n_steps=1)
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "train_neg_cos_sim_step" in header and "directpred/" not in header
