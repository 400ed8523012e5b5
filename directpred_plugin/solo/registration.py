"""``register()``: solo-learn's method classes, patched in place, honour ``method_kwargs.predictor``.

Each class in ``solo.methods.METHODS`` gets wrappers around five of its methods that add the
adapter's work (check the cfg, build the heads, IsoLoss, diagnostics, checkpoint checks)
once per outermost call; ``unregister()`` restores the classes, and a model pickled while
registered registers again when it is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import _directpred_solo_autoregister as _hook

from ..losses import IsoLoss
from .config import check_method_kwargs, read_settings
from .diagnostics import DiagnosticsLog
from .install import drop_empty_groups, install_predictors
from .isoloss import IsoLossStep
from .methods import ISOLOSS_METHODS, METHOD_PREDICTORS
from .resume import RESUME_MUST_MATCH, check_checkpoint_predictors

__all__ = ["register", "unregister", "SOLO_INSTALL_HINT"]

SOLO_INSTALL_HINT = (
    "directpred_plugin.solo needs solo-learn, installed from source (the PyPI release is a "
    "2021 build pinned to torch 1.9): git clone https://github.com/vturrisi/solo-learn && "
    'pip install "torchmetrics<0.12" "setuptools<81" einops && '
    "pip install --no-deps --no-build-isolation -e ./solo-learn "
    "(see integrations/solo_learn/README.md in the directpred-plugin repository)"
)

# register() patches solo-learn's classes in place rather than putting subclasses into
# METHODS: solo-learn's tests, notebooks and users build models from the classes too
# (`solo.methods.BYOL(cfg)`, subclasses of it), and a subclass in METHODS would leave those
# silently on the MLP. In place, the class keeps its module and name, so pickle (ddp_spawn)
# finds it as solo-learn's own.

#: The methods patched on each registered class. Each wrapper keeps the original reachable
#: as ``__wrapped__`` and adds its work only in the outermost call: a method calls its
#: parent's (`super(BYOL, BYOL).add_and_assert_specific_cfg`, `super().__init__`), and the
#: parent may be registered too (BaseMethod is METHODS["base"]).
_PATCHED = ("__init__", "add_and_assert_specific_cfg", "learnable_params", "training_step", "on_train_batch_end",
            "on_load_checkpoint")
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
    method's ``__init__``, keeps the optimizer's parameter groups valid, trains with IsoLoss
    for ``method_kwargs.loss: isoloss``, logs the heads' diagnostics and refuses to resume a
    checkpoint trained with another predictor. ``METHODS[...](cfg)``, ``solo.methods.BYOL(cfg)``
    and subclasses all get it. Without ``method_kwargs.predictor`` the model is the method's
    own, module for module. Removes the guard the start-up hook installs when it is turned
    off. Idempotent; `unregister` restores solo-learn's classes.

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
    """Undo `register`: solo-learn's classes and ``AutoResumer.SHOULD_MATCH`` as they were.

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
                cfg = check_method_kwargs(_method_key(cls), cfg)
        return cfg

    @_wrapper(cls, "learnable_params", own["learnable_params"])
    def learnable_params(self: Any) -> List[Dict[str, Any]]:
        with _outermost(id(self), "learnable_params") as outermost:
            original = own["learnable_params"]
            groups = super(base, self).learnable_params if original is _MISSING else original.fget(self)
            return drop_empty_groups(self, groups) if outermost else groups

    @_wrapper(cls, "training_step", own["training_step"])
    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _outermost(id(self), "training_step") as outermost:
            isoloss_step = getattr(self, "_isoloss_step", None) if outermost else None
            if isoloss_step is not None:
                return isoloss_step.run(_own_function(base, "training_step"), self, *args, **kwargs)
            if own["training_step"] is _MISSING:
                return super(base, self).training_step(*args, **kwargs)
            return own["training_step"](self, *args, **kwargs)

    @_wrapper(cls, "on_train_batch_end", own["on_train_batch_end"])
    def on_train_batch_end(self: Any, *args: Any, **kwargs: Any) -> None:
        with _outermost(id(self), "on_train_batch_end") as outermost:
            if own["on_train_batch_end"] is _MISSING:
                super(base, self).on_train_batch_end(*args, **kwargs)
            else:
                own["on_train_batch_end"](self, *args, **kwargs)
            diagnostics = getattr(self, "_directpred_diagnostics", None)
            if outermost and diagnostics is not None:
                diagnostics.after_batch(self)

    @_wrapper(cls, "on_load_checkpoint", own["on_load_checkpoint"])
    def on_load_checkpoint(self: Any, checkpoint: Dict[str, Any]) -> None:
        with _outermost(id(self), "on_load_checkpoint") as outermost:
            if own["on_load_checkpoint"] is _MISSING:
                super(base, self).on_load_checkpoint(checkpoint)
            else:
                own["on_load_checkpoint"](self, checkpoint)
            if outermost:
                check_checkpoint_predictors(self, checkpoint.get("state_dict", {}))

    setattr(cls, "__init__", __init__)
    setattr(cls, "add_and_assert_specific_cfg", staticmethod(add_and_assert_specific_cfg))
    setattr(cls, "learnable_params", property(learnable_params))
    setattr(cls, "training_step", training_step)
    setattr(cls, "on_train_batch_end", on_train_batch_end)
    setattr(cls, "on_load_checkpoint", on_load_checkpoint)


def _own_function(cls: type, name: str) -> Any:
    """solo-learn's own ``cls.name``: the first definition in the MRO, before any patching."""
    for klass in cls.__mro__:
        original = _ORIGINALS[klass][1].get(name, _MISSING) if klass in _ORIGINALS else klass.__dict__.get(name,
                                                                                                           _MISSING)
        if original is not _MISSING:
            return original
    raise AttributeError(f"{cls.__qualname__} has no {name}")


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
    """Build what the model's cfg asks of the adapter, once solo-learn's ``__init__`` built the model."""
    key = _method_key(type(model))
    model.solo_method = key
    model._directpred_registration = _REGISTRATION
    settings = read_settings(key, model.cfg)
    model.replaced_predictors = install_predictors(model, key, settings) if key in METHOD_PREDICTORS else []
    model.isoloss = None
    model._isoloss_step = None
    if settings.isoloss_form is not None:
        assert key is not None
        model.isoloss = IsoLoss(model.predictor, form=settings.isoloss_form)
        model._isoloss_step = IsoLossStep(model.isoloss, ISOLOSS_METHODS[key])
        model.predictor.register_forward_hook(model._isoloss_step.record)
    model._directpred_diagnostics = DiagnosticsLog(settings.log_every_n_steps, model.replaced_predictors)
