"""solo-learn adapter: switch a method's MLP predictor to DirectPred from the YAML config.

With the registration active, one line in a solo-learn pretraining config replaces the
predictor of BYOL, SimSiam and every other solo-learn method that has one::

    method_kwargs:
      predictor: directpred      # default: "mlp", solo-learn's own predictor, unchanged
      directpred:                # optional DirectPredHead options, see DIRECTPRED_OPTIONS
        rho: 0.3
        freq: 1

``predictor`` takes ``mlp`` or any name of :data:`directpred_plugin.VARIANTS`
(``directpred``, ``directcopy``, ``ns``, ``directpred-hybrid``, ...), each with that name's
defaults (:func:`predictor_choices`); ``method_kwargs.directpred`` holds the options the
config changes, for every closed-form choice. A name builds the same head here as
``DirectPredHead(dim, variant=name)`` and the benchmarks do.

solo-learn's own command then uses DirectPred, in the main process and in the DDP workers
Lightning starts::

    python main_pretrain.py --config-path scripts/pretrain/cifar --config-name byol.yaml

The package installs a start-up hook (``_directpred_solo_autoregister``) that calls
:func:`register` right after ``solo.methods`` is imported. ``DIRECTPRED_SOLO_AUTOREGISTER=0``
turns it off; a config that asks for a DirectPred predictor is then refused rather than
trained with the MLP, until the script runs through the launcher,
``python -m directpred_plugin.solo main_pretrain.py ...``, or calls :func:`register`.

:func:`register` patches solo-learn's method classes in place, so every way of building a
model honours the key: ``METHODS["byol"](cfg)``, ``solo.methods.BYOL(cfg)`` and subclasses
of them. :data:`METHOD_PREDICTORS` says which attributes of which solo-learn methods hold a
predictor, and how often a training step calls each. solo-learn is imported only when
:func:`register` runs, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union, cast

import torch
from torch import nn

import _directpred_solo_autoregister as _hook

from ..head import DirectPredHead
from ..options import AUTO
from ..losses import IsoLoss
from ..variants import VARIANTS

__all__ = [
    "ISOLOSS_METHODS",
    "LOSSES",
    "METHOD_PREDICTORS",
    "DIRECTPRED_OPTIONS",
    "predictor_choices",
    "register",
    "unregister",
    "directpred_options",
    "build_directpred",
    "resolved_options",
    "log_to_stderr",
]

SOLO_INSTALL_HINT = (
    "directpred_plugin.solo needs solo-learn, installed from source (the PyPI release is a "
    "2021 build pinned to torch 1.9): git clone https://github.com/vturrisi/solo-learn && "
    'pip install "torchmetrics<0.12" "setuptools<81" einops && '
    "pip install --no-deps --no-build-isolation -e ./solo-learn "
    "(see integrations/solo_learn/README.md in the directpred-plugin repository)"
)


# --------------------------------------------------------------------------- predictors
#: ``method_kwargs.predictor`` value for solo-learn's own predictor.
MLP = "mlp"

_STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Keys accepted under ``method_kwargs.directpred``: the :class:`DirectPredHead` options
#: (``stats_dtype`` as ``"float32"``/``"float64"``; ``calls_per_update: null`` means one
#: update per training step, see :func:`build_directpred`).
DIRECTPRED_OPTIONS: Tuple[str, ...] = (
    "rho",
    "eps",
    "freq",
    "variant",
    "trainable",
    "center",
    "calls_per_update",
    "stats_dtype",
    "sync_dist",
    "refresh",
    "refresh_options",
    "alpha",
    "eps_inside",
    "ridge",
    "weight_momentum",
)


def predictor_choices() -> Dict[str, Optional[Dict[str, Any]]]:
    """The values ``method_kwargs.predictor`` accepts: ``mlp`` (None: the method's own predictor)
    and every name of :data:`directpred_plugin.VARIANTS`, with the options that name stands for."""
    choices: Dict[str, Optional[Dict[str, Any]]] = {MLP: None}
    choices.update((name, _name_options(name)) for name in VARIANTS)
    return choices


def _name_options(name: str, **options: Any) -> Dict[str, Any]:
    """The options a closed-form name stands for, under ``options``, with its variant."""
    return {**VARIANTS[name].defaults, **options, "variant": name}


def _registry_name(predictor: str, options: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The registry name to build and the options to build it with (``variant`` resolved)."""
    options = dict(options)
    if "variant" in options:
        variant = options["variant"]
        # `predictor: directpred` with `variant: ns` names the member as `predictor: ns` does,
        # with that member's defaults (configs written before every member was a choice).
        if predictor == "directpred" and isinstance(variant, str) and variant in VARIANTS:
            predictor = variant
            del options["variant"]
        elif variant == predictor:
            del options["variant"]  # the name says it
        else:
            raise ValueError(f"predictor {predictor!r} is variant {predictor!r}, got variant={variant!r}; "
                             f"name the member instead (one of {list(VARIANTS)})")
    return predictor, options


def _create(predictor: str, dim: int, options: Mapping[str, Any], calls_per_step: int) -> nn.Module:
    name, kwargs = _registry_name(predictor, options)
    if "stats_dtype" in kwargs:
        kwargs["stats_dtype"] = _STATS_DTYPES[kwargs["stats_dtype"]]
    if kwargs.get("calls_per_update", AUTO) is None:
        kwargs["calls_per_update"] = calls_per_step
    return DirectPredHead(dim, variant=name, **kwargs)


def directpred_options(options: Optional[Mapping[str, Any]] = None, predictor: str = "directpred") -> Dict[str, Any]:
    """Validate ``method_kwargs.directpred`` for ``method_kwargs.predictor: <predictor>``.

    Returns the options the config gives, with ``calls_per_update`` defaulting to the head's
    ``"auto"`` (one update per optimizer step): what is stored back into the cfg (and compared by
    solo-learn's auto-resume). Nothing else is filled in: the head applies the name's
    defaults, and an option that means nothing for the variant is refused, not passed.
    Raises ``ValueError`` naming the option and what was expected.
    """
    closed_form = list(VARIANTS)
    if predictor not in closed_form:
        raise ValueError(f"method_kwargs.predictor {predictor!r} takes no method_kwargs.directpred options; "
                         f"closed-form predictors: {closed_form}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(DIRECTPRED_OPTIONS))
    if unknown:
        raise ValueError(
            f"method_kwargs.directpred: unknown option(s) {unknown}; valid options: {list(DIRECTPRED_OPTIONS)}"
        )
    stats_dtype = options.get("stats_dtype", "float32")
    if not isinstance(stats_dtype, str) or stats_dtype not in _STATS_DTYPES:
        raise ValueError(
            f"method_kwargs.directpred.stats_dtype must be one of {sorted(_STATS_DTYPES)}, got {stats_dtype!r}"
        )
    options.setdefault("calls_per_update", AUTO)
    try:  # the head's own checks, on a 1x1 head, so that the messages stay in one place
        _create(predictor, 1, options, calls_per_step=1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"method_kwargs.directpred: {err}") from None
    return options


def resolved_options(predictor: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The registry's defaults for ``predictor`` under the options given: what the head gets."""
    name, kwargs = _registry_name(predictor, options)
    return _name_options(name, **kwargs)


def build_directpred(dim: int, options: Mapping[str, Any], calls_per_step: int,
                     predictor: str = "directpred") -> DirectPredHead:
    """The head ``method_kwargs.predictor: <predictor>`` puts in a solo-learn predictor slot.

    Built as ``DirectPredHead(dim, variant=predictor, ...)`` from ``options`` (validated by
    :func:`directpred_options`). Unless ``calls_per_update`` is set, the head pools the
    calls between two optimizer steps: all views and micro-batches of a step are predicted
    with the same ``W_p``, the EMA takes one step from their pooled correlation and ``freq``
    counts optimizer steps, as in the paper. ``calls_per_update: null`` pools ``calls_per_step``
    training-mode calls instead (one per view: BYOL also predicts its small crops).
    """
    head = _create(predictor, dim, directpred_options(options, predictor), calls_per_step)
    assert isinstance(head, DirectPredHead)  # closed-form names build DirectPredHead
    return head


# ------------------------------------------------------------------------------ methods
def _large_crops(model: Any) -> int:
    return model.num_large_crops  # forward() runs once per large crop


def _all_crops(model: Any) -> int:
    return model.num_crops  # BYOL's multicrop_forward() also predicts every small crop


def _twice_per_large_crop(model: Any) -> int:
    return 2 * model.num_large_crops  # All4One: in forward() and again in training_step()


#: solo-learn method -> {attribute holding a predictor: training-mode calls per step}.
#: Every predictor listed maps ``proj_output_dim`` to itself and is called on the projector
#: output ``z``. byol, simsiam, nnbyol and nnsiam train it against a stop-gradient target
#: with a cosine loss, the setting DirectPred is derived for; nnclr, mocov3 and all4one
#: train it through a contrastive loss, where the swap works but the paper says nothing.
#: Add an entry to make a custom method's predictor switchable.
METHOD_PREDICTORS: Dict[str, Dict[str, Callable[[Any], int]]] = {
    "byol": {"predictor": _all_crops},
    "simsiam": {"predictor": _large_crops},
    "nnbyol": {"predictor": _large_crops},
    "nnsiam": {"predictor": _large_crops},
    "nnclr": {"predictor": _large_crops},
    "mocov3": {"predictor": _large_crops},
    "all4one": {"predictor": _twice_per_large_crop, "predictor2": _large_crops},
}

#: solo-learn method -> (module, name of the loss function its ``training_step`` calls as
#: ``loss(p, z_target)``, the factor from IsoLoss's scale to that function's). With
#: ``method_kwargs.loss: isoloss`` that function is IsoLoss for the duration of a training
#: step: BYOL's ``2 - 2 cos`` becomes ``2 + 2 IsoLoss``, SimSiam's ``-cos`` IsoLoss itself.
ISOLOSS_METHODS: Dict[str, Tuple[str, str, float, float]] = {
    "byol": ("solo.methods.byol", "byol_loss_func", 2.0, 2.0),
    "nnbyol": ("solo.methods.nnbyol", "byol_loss_func", 2.0, 2.0),
    "simsiam": ("solo.methods.simsiam", "simsiam_loss_func", 0.0, 1.0),
    "nnsiam": ("solo.methods.nnsiam", "simsiam_loss_func", 0.0, 1.0),
}
#: Values of ``method_kwargs.loss``; options of IsoLoss go under ``method_kwargs.isoloss``.
LOSSES = ("default", "isoloss")

#: cfg keys appended to solo-learn's ``AutoResumer.SHOULD_MATCH``: a run never auto-resumes
#: a checkpoint trained with another predictor (its state_dict would not load). The cfg
#: holds the options the config gave (validated), so equal configs compare equal.
RESUME_MUST_MATCH = ("method_kwargs.predictor", "method_kwargs.directpred")


# --------------------------------------------------------------------------- registration
# register() patches solo-learn's classes in place rather than putting subclasses into
# METHODS: solo-learn's tests, notebooks and users build models from the classes too
# (`solo.methods.BYOL(cfg)`, subclasses of it), and a subclass in METHODS would leave those
# silently on the MLP. In place, the class keeps its module and name, so pickle (ddp_spawn)
# finds it as solo-learn's own.

#: The methods patched on each registered class. Each wrapper keeps the original reachable
#: as ``__wrapped__`` and adds its work only in the outermost call: a method calls its
#: parent's (`super(BYOL, BYOL).add_and_assert_specific_cfg`, `super().__init__`), and the
#: parent may be registered too (BaseMethod is METHODS["base"]).
_PATCHED = ("__init__", "add_and_assert_specific_cfg", "learnable_params", "training_step", "on_load_checkpoint")
_MISSING = object()

#: Registered class -> (its key in ``solo.methods.METHODS``, {patched name: what the class's
#: own ``__dict__`` held before, or _MISSING where it inherited it}).
_ORIGINALS: Dict[type, Tuple[str, Dict[str, Any]]] = {}
_ADDED_RESUME_KEYS: List[str] = []
_ACTIVE: Set[Tuple[Any, str]] = set()


def _import_solo() -> Tuple[Dict[str, Any], type, Any]:
    try:
        from solo.methods import METHODS
        from solo.methods.base import BaseMethod
        from solo.utils.auto_resumer import AutoResumer
    except ImportError as err:
        raise ImportError(f"{SOLO_INSTALL_HINT} ({err})") from err
    return METHODS, BaseMethod, AutoResumer


def register() -> None:
    """Make ``method_kwargs.predictor`` work on every solo-learn model, however it is built.

    Each ``BaseMethod`` class in ``solo.methods.METHODS`` is patched in place: it checks the
    predictor choice when solo-learn checks its cfg, builds the chosen predictor after the
    method's ``__init__``, keeps the optimizer's parameter groups valid, swaps in IsoLoss
    for ``method_kwargs.loss: isoloss`` and refuses to resume a checkpoint trained with
    another predictor. ``METHODS[...](cfg)``, ``solo.methods.BYOL(cfg)`` and subclasses all
    get it. Without ``method_kwargs.predictor`` the model is the method's own, module for
    module. Removes the guard the start-up hook installs when it is turned off. Idempotent;
    :func:`unregister` restores solo-learn's classes.

    Raises ``ImportError`` with install instructions when solo-learn is missing.
    """
    methods, base_method, auto_resumer = _import_solo()
    _hook.remove_guard(base_method)
    for key, cls in list(methods.items()):
        if isinstance(cls, type) and issubclass(cls, base_method) and cls not in _ORIGINALS:
            _patch(cls, key)
    for key in RESUME_MUST_MATCH:
        if key not in auto_resumer.SHOULD_MATCH:
            auto_resumer.SHOULD_MATCH.append(key)
            _ADDED_RESUME_KEYS.append(key)


def unregister() -> None:
    """Undo :func:`register`: solo-learn's classes and ``AutoResumer.SHOULD_MATCH`` as they were.

    Models built while registered keep their DirectPred heads but lose the patched methods.
    """
    for cls, (_, own) in list(_ORIGINALS.items()):
        for name, value in own.items():
            if value is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, value)
        del _ORIGINALS[cls]
    if _ADDED_RESUME_KEYS:
        from solo.utils.auto_resumer import AutoResumer

        for key in _ADDED_RESUME_KEYS:
            if key in AutoResumer.SHOULD_MATCH:
                AutoResumer.SHOULD_MATCH.remove(key)
        _ADDED_RESUME_KEYS.clear()


@contextlib.contextmanager
def _outermost(owner: Any, name: str) -> Iterator[bool]:
    key = (owner, name)
    if key in _ACTIVE:
        yield False
        return
    _ACTIVE.add(key)
    try:
        yield True
    finally:
        _ACTIVE.discard(key)


def _method_key(cls: type) -> Optional[str]:
    """The solo-learn method whose predictors ``cls`` has: its own key, or a registered base's.

    A subclass of BYOL (registered or not) has BYOL's predictor; a method without a
    predictor keeps its own key, for the error message.
    """
    keys = [_ORIGINALS[c][0] for c in cls.__mro__ if c in _ORIGINALS]
    for key in keys:
        if key in METHOD_PREDICTORS:
            return key
    return keys[0] if keys else None


def _wrapper(cls: type, name: str, original: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        if original is not _MISSING:
            wrapped = getattr(original, "__func__", getattr(original, "fget", original))
            functools.update_wrapper(function, wrapped)
        function.__module__ = __name__
        function.__qualname__ = f"{cls.__qualname__}.{name}"
        return function

    return decorate


def _patch(cls: type, key: str) -> None:
    own = {name: cls.__dict__.get(name, _MISSING) for name in _PATCHED}
    _ORIGINALS[cls] = (key, own)
    base: Any = cls  # for super(); solo-learn has no type information

    @_wrapper(cls, "__init__", own["__init__"])
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with _outermost(id(self), "__init__") as outermost:
            if own["__init__"] is _MISSING:
                super(base, self).__init__(*args, **kwargs)
            else:
                own["__init__"](self, *args, **kwargs)
            if outermost:
                _after_init(self)

    @_wrapper(cls, "add_and_assert_specific_cfg", own["add_and_assert_specific_cfg"])
    def add_and_assert_specific_cfg(cfg: Any) -> Any:
        # A staticmethod: no instance to key on, and solo-learn checks cfgs on one thread.
        with _outermost(threading.get_ident(), "add_and_assert_specific_cfg") as outermost:
            original = own["add_and_assert_specific_cfg"]
            if original is _MISSING:
                cfg = super(base, base).add_and_assert_specific_cfg(cfg)
            else:
                cfg = original.__func__(cfg)
            if outermost:
                cfg = _check_predictor_cfg(_method_key(cls), cfg)
        return cfg

    @_wrapper(cls, "learnable_params", own["learnable_params"])
    def learnable_params(self: Any) -> List[Dict[str, Any]]:
        with _outermost(id(self), "learnable_params") as outermost:
            original = own["learnable_params"]
            groups = super(base, self).learnable_params if original is _MISSING else original.fget(self)
            return _drop_empty_groups(self, groups) if outermost else groups

    @_wrapper(cls, "training_step", own["training_step"])
    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        def step() -> Any:
            if own["training_step"] is _MISSING:
                return super(base, self).training_step(*args, **kwargs)
            return own["training_step"](self, *args, **kwargs)

        with _outermost(id(self), "training_step") as outermost:
            if not outermost or getattr(self, "isoloss", None) is None:
                return step()
            return _with_isoloss(self, step)

    @_wrapper(cls, "on_load_checkpoint", own["on_load_checkpoint"])
    def on_load_checkpoint(self: Any, checkpoint: Dict[str, Any]) -> None:
        with _outermost(id(self), "on_load_checkpoint") as outermost:
            if own["on_load_checkpoint"] is _MISSING:
                super(base, self).on_load_checkpoint(checkpoint)
            else:
                own["on_load_checkpoint"](self, checkpoint)
            if outermost:
                _check_checkpoint_predictors(self, checkpoint.get("state_dict", {}))

    setattr(cls, "__init__", __init__)
    setattr(cls, "add_and_assert_specific_cfg", staticmethod(add_and_assert_specific_cfg))
    setattr(cls, "learnable_params", property(learnable_params))
    setattr(cls, "training_step", training_step)
    setattr(cls, "on_load_checkpoint", on_load_checkpoint)


class _Registration:
    """Kept on every model built while registered: unpickling it registers again.

    A ddp_spawn worker (or any interpreter that loads a pickled model) may have the start-up
    hook turned off; the model's class would then be solo-learn's unpatched one, and e.g.
    its training step would silently drop IsoLoss.
    """

    def __reduce__(self) -> Tuple[Callable[[], "_Registration"], Tuple[()]]:
        return _registered, ()


def _registered() -> _Registration:
    register()
    return _REGISTRATION


_REGISTRATION = _Registration()


def _after_init(model: Any) -> None:
    key = _method_key(type(model))
    model.solo_method = key
    model._directpred_registration = _REGISTRATION
    # Checked again: a subclass may override add_and_assert_specific_cfg without calling ours.
    _check_predictor_cfg(key, model.cfg, warn=False)
    model.replaced_predictors = _install_predictors(model, key, model.cfg)
    model.isoloss = None
    model._prediction_inputs = {}
    model._recording_predictions = False
    kwargs = model.cfg.method_kwargs
    if kwargs.get("loss", "default") == "isoloss":
        model.isoloss = IsoLoss(model.predictor, form=kwargs.isoloss.form)
        model.predictor.register_forward_hook(functools.partial(_record_prediction, model))


def _record_prediction(model: Any, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> None:
    if model._recording_predictions:  # IsoLoss needs the predictor's input next to its output
        model._prediction_inputs[id(output)] = args[0]


def _with_isoloss(model: Any, step: Callable[[], Any]) -> Any:
    module_name, name, offset, factor = ISOLOSS_METHODS[model.solo_method]
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    isoloss, inputs = model.isoloss, model._prediction_inputs

    def loss(p: torch.Tensor, z_target: torch.Tensor, simplified: bool = True) -> torch.Tensor:
        z = inputs.get(id(p))
        if z is None:
            raise RuntimeError(f"{module_name}.{name} got a prediction the DirectPred head did not make")
        return offset + factor * isoloss(z, p, z_target)

    setattr(module, name, loss)
    model._recording_predictions = True
    try:
        return step()
    finally:
        setattr(module, name, original)
        model._recording_predictions = False
        inputs.clear()


def _drop_empty_groups(model: Any, groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    replaced = getattr(model, "replaced_predictors", [])
    if not any(not list(getattr(model, attr).parameters()) for attr in replaced):
        return groups
    # A closed-form head has no parameters; drop the empty group it leaves so every
    # optimizer (and solo's static-lr bookkeeping) only sees groups with parameters.
    kept = []
    for group in groups:
        group = dict(group, params=list(group["params"]))
        if group["params"]:
            kept.append(group)
    return kept


def _choice(cfg: Any) -> Optional[str]:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, "method_kwargs.predictor", default=None)
    return None if value in (None, "None") else value


def _check_predictor_cfg(method: Optional[str], cfg: Any, warn: bool = True) -> Any:
    """Validate ``method_kwargs.predictor`` and its options for ``method``.

    Runs inside solo-learn's ``add_and_assert_specific_cfg``, before any module is built;
    stores back only validated values (see :func:`directpred_options`).
    """
    from omegaconf import OmegaConf

    kwargs = cfg.method_kwargs
    choice = _choice(cfg)
    choices = predictor_choices()
    if method not in METHOD_PREDICTORS:
        given = [f"method_kwargs.{k}" for k in ("predictor", "directpred", "isoloss") if k in kwargs]
        if kwargs.get("loss") == "isoloss":
            given.append("method_kwargs.loss: isoloss")
        if given:
            raise ValueError(
                f"method {method!r} has no predictor to replace, so {', '.join(given)} cannot be "
                f"set; methods with a predictor: {sorted(METHOD_PREDICTORS)} "
                "(directpred_plugin.solo.METHOD_PREDICTORS)"
            )
        return cfg
    if choice is not None and not (isinstance(choice, str) and choice in choices):
        raise ValueError(
            f"method_kwargs.predictor must be one of {sorted(choices)}, got {choice!r} "
            "(directpred_plugin.solo.predictor_choices())"
        )
    closed_form = choice is not None and choices[choice] is not None
    if not closed_form and "directpred" in kwargs and warn:
        logging.getLogger(__name__).warning(
            "method_kwargs.directpred is ignored: method_kwargs.predictor is %r", choice or MLP
        )
    if closed_form:
        assert choice is not None
        raw = kwargs.get("directpred")
        if raw is None:
            raw = {}
        elif OmegaConf.is_dict(raw):
            raw = OmegaConf.to_container(raw, resolve=True)
        else:
            raise ValueError(f"method_kwargs.directpred must be a mapping of options, got {raw!r}")
        kwargs["directpred"] = directpred_options(cast(Dict[str, Any], raw), choice)
    _check_loss_cfg(method, choice if closed_form else None, kwargs)
    return cfg


def _check_loss_cfg(method: str, choice: Optional[str], kwargs: Any) -> None:
    """Validate ``method_kwargs.loss`` / ``method_kwargs.isoloss`` and fill IsoLoss's defaults."""
    from omegaconf import OmegaConf

    loss = kwargs.get("loss", "default")
    if loss not in LOSSES:
        raise ValueError(f"method_kwargs.loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss != "isoloss":
        if "isoloss" in kwargs:
            raise ValueError("method_kwargs.isoloss is set, but method_kwargs.loss is not isoloss")
        return
    if method not in ISOLOSS_METHODS:
        raise ValueError(
            f"method_kwargs.loss: isoloss is available for {sorted(ISOLOSS_METHODS)} "
            f"(directpred_plugin.solo.ISOLOSS_METHODS), not {method!r}"
        )
    if choice is None:
        raise ValueError(
            "method_kwargs.loss: isoloss needs a closed-form predictor: set method_kwargs.predictor: "
            f"directpred (or another of {list(VARIANTS)})"
        )
    options = OmegaConf.to_container(kwargs.directpred, resolve=True)
    if resolved_options(choice, cast(Dict[str, Any], options)).get("trainable", False):
        raise ValueError(
            f"method_kwargs.loss: isoloss cannot train a trainable head (method_kwargs.predictor: {choice} "
            "with trainable: true): IsoLoss hands the loss's gradient to z directly, so W_p would get no "
            "gradient and would never be trained. Set method_kwargs.directpred.trainable: false "
            "(W_p in closed form only), or keep solo-learn's loss"
        )
    raw = kwargs.get("isoloss") or {}
    raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_dict(raw) else raw
    if not isinstance(raw, dict) or set(raw) - {"form"}:
        raise ValueError(f"method_kwargs.isoloss takes only `form` (cosine or l2), got {raw!r}")
    form = raw.get("form", "cosine")
    if form not in ("cosine", "l2"):
        raise ValueError(f"method_kwargs.isoloss.form must be cosine or l2, got {form!r}")
    kwargs["isoloss"] = {"form": form}


def _install_predictors(model: nn.Module, method: Optional[str], cfg: Any) -> List[str]:
    from omegaconf import OmegaConf

    choice = _choice(cfg) if method in METHOD_PREDICTORS else None
    if choice is None or predictor_choices().get(choice) is None:
        return []
    assert method is not None
    options = cast(Dict[str, Any], OmegaConf.to_container(cfg.method_kwargs.directpred, resolve=True))
    replaced = []
    for attr, calls_per_step in METHOD_PREDICTORS[method].items():
        dim = _square_width(getattr(model, attr), f"{method}.{attr}")
        head = build_directpred(dim, options, calls_per_step(model), predictor=choice)
        setattr(model, attr, head)
        replaced.append(attr)
        rank = os.environ.get("LOCAL_RANK")
        # Looked up here rather than at import: hydra's `job_logging: disabled` (solo-learn's
        # configs) disables every logger that already exists when it configures logging.
        logging.getLogger(__name__).info(
            "%s.%s = %s(%s), %d calls per training step (pid %d%s)",
            method, attr, type(head).__name__, head.extra_repr(), calls_per_step(model),
            os.getpid(), f", LOCAL_RANK {rank}" if rank else "",
        )
    return replaced


def _square_width(module: nn.Module, where: str) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[0].in_features != linears[-1].out_features:
        raise ValueError(
            f"{where}: DirectPred replaces a predictor that maps its input width to itself "
            f"(W_p is square), found {module!r}"
        )
    return linears[0].in_features


def _check_checkpoint_predictors(model: Any, state_dict: Mapping[str, Any]) -> None:
    method = getattr(model, "solo_method", None)  # None: built before register()
    for attr in METHOD_PREDICTORS.get(method, {}) if method else ():
        saved = [k for k in state_dict if k.startswith(attr + ".")]
        if not saved:
            continue
        # version 3 heads keep F_hat under stats., earlier ones at the top
        saved_directpred = f"{attr}.corr" in state_dict
        built_directpred = isinstance(getattr(model, attr), DirectPredHead)
        if saved_directpred != built_directpred:
            describe = {True: "a DirectPred head (a closed-form method_kwargs.predictor)",
                        False: "solo-learn's MLP (method_kwargs.predictor: mlp or unset)"}
            raise RuntimeError(
                f"cannot resume {method}: the checkpoint's {attr} is {describe[saved_directpred]}, "
                f"but this run builds {describe[built_directpred]}. Resume with the predictor setting "
                "the checkpoint was trained with."
            )


def log_to_stderr() -> None:
    """Show this package's INFO lines (which predictor each model got) on stderr, once.

    solo-learn's configs disable hydra's logging setup, so without a handler of its own the
    line that confirms DirectPred is in use would not appear.
    """
    logger = logging.getLogger("directpred_plugin")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # solo-learn's code may give the root logger a handler too
