"""Registers DirectPred with solo-learn as soon as solo-learn's method registry is imported.

directpred-plugin installs ``directpred_plugin_solo.pth`` into site-packages; Python runs
its one line, ``import _directpred_solo_autoregister; ...install()``, at every start-up.
:func:`install` only puts :class:`SoloMethodsFinder` at the front of ``sys.meta_path``:
nothing else is imported (not torch, not solo-learn, not directpred_plugin), so an
interpreter that never imports ``solo.methods`` pays for one tiny module and nothing more.

When a program (``python main_pretrain.py ...``, or a DDP worker Lightning starts with
the same command) imports ``solo.methods``, the finder lets the normal import machinery
find and execute it, then calls ``directpred_plugin.solo.register()`` before the import
returns. ``method_kwargs.predictor: directpred`` then works without a launcher.

Set ``DIRECTPRED_SOLO_AUTOREGISTER=0`` to turn the registration off (read when
``solo.methods`` is imported). The finder then installs a guard instead, swapping nothing:
solo-learn refuses a cfg whose ``method_kwargs.predictor`` asks for anything but its MLP,
rather than silently training the MLP. An explicit ``directpred_plugin.solo.register()``
(or the launcher, ``python -m directpred_plugin.solo SCRIPT.py``) removes the guard. The
guard imports nothing of directpred_plugin, so it works where the plugin itself is broken.
"""

import os
import sys

# Not `typing.TYPE_CHECKING`, nor `from __future__ import annotations`: importing typing or
# __future__ would cost more than the rest of this module. Annotations are strings instead.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any, Mapping, Optional, Sequence

#: Environment variable that turns the automatic registration off when set to one of
#: :data:`OFF_VALUES`.
OPT_OUT_ENV = "DIRECTPRED_SOLO_AUTOREGISTER"
OFF_VALUES = ("0", "false", "no", "off")
#: The module whose import triggers the registration: solo-learn's ``METHODS`` registry.
TRIGGER_MODULE = "solo.methods"


def enabled(environ: "Optional[Mapping[str, str]]" = None) -> bool:
    """Whether the automatic registration is on (it is unless :data:`OPT_OUT_ENV` says off)."""
    value = (os.environ if environ is None else environ).get(OPT_OUT_ENV, "")
    return value.strip().lower() not in OFF_VALUES


class _RegisteringLoader:
    """Runs the real loader of ``solo.methods``, then registers DirectPred."""

    def __init__(self, loader: "Any") -> None:
        self._loader = loader

    def create_module(self, spec: "Any") -> "Optional[ModuleType]":
        return self._loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        self._loader.exec_module(module)
        if enabled():
            _register()
        else:
            _guard()

    def __getattr__(self, name: str) -> "Any":
        # get_source, get_resource_reader, ...: what tools ask of the real loader
        return getattr(self._loader, name)


class SoloMethodsFinder:
    """A ``sys.meta_path`` finder that only ever answers for ``solo.methods``.

    Once it has run, ``solo.methods`` is registered (:func:`_register`) or, with the
    registration turned off, guarded (:func:`_guard`).

    It asks the finders behind it for the real spec and wraps its loader, so solo-learn's
    module is found and executed exactly as without the hook.
    """

    def find_spec(
        self, fullname: str, path: "Optional[Sequence[str]]" = None, target: "Optional[ModuleType]" = None
    ) -> "Any":
        if fullname != TRIGGER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, SoloMethodsFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _register() -> None:
    try:
        from directpred_plugin.solo import log_to_stderr, register

        register()
    except Exception as err:
        # A solo-learn run that silently trains the MLP instead of DirectPred would be
        # worse than no run: fail the import, and say how to run without the plugin.
        raise ImportError(
            f"directpred-plugin could not register DirectPred with solo-learn ({type(err).__name__}: {err}). "
            f"Set {OPT_OUT_ENV}=0 to use solo-learn without it."
        ) from err
    log_to_stderr()


#: Set on the guard's function, so that it is found (and removed) however it is reached.
GUARD_MARK = "__directpred_guard__"
_MLP_CHOICES = (None, "None", "mlp")


def _guard() -> None:
    from solo.methods.base import BaseMethod

    install_guard(BaseMethod)


def install_guard(base_method: "Any") -> None:
    """Make solo-learn refuse cfgs that ask for a DirectPred predictor, swapping nothing.

    Wraps ``base_method.add_and_assert_specific_cfg``, which every solo-learn method's own
    check calls and ``BaseMethod.__init__`` runs before building any module. Idempotent.
    """
    current = base_method.__dict__["add_and_assert_specific_cfg"]
    original = getattr(current, "__func__", current)
    if getattr(original, GUARD_MARK, False):
        return

    def add_and_assert_specific_cfg(cfg: "Any") -> "Any":
        _refuse_unregistered_predictor(cfg)
        return original(cfg)

    add_and_assert_specific_cfg.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(add_and_assert_specific_cfg, GUARD_MARK, True)
    base_method.add_and_assert_specific_cfg = staticmethod(add_and_assert_specific_cfg)


def remove_guard(base_method: "Any") -> None:
    """Undo :func:`install_guard` (``register()`` calls this); nothing happens without a guard."""
    current = base_method.__dict__.get("add_and_assert_specific_cfg")
    function = getattr(current, "__func__", None)
    if function is not None and getattr(function, GUARD_MARK, False):
        base_method.add_and_assert_specific_cfg = staticmethod(function.__wrapped__)


def _refuse_unregistered_predictor(cfg: "Any") -> None:
    from omegaconf import OmegaConf

    choice = OmegaConf.select(cfg, "method_kwargs.predictor", default=None)
    if choice in _MLP_CHOICES:
        return
    raise ValueError(
        f"method_kwargs.predictor is {choice!r}, but directpred-plugin is not registered with solo-learn "
        f"({OPT_OUT_ENV}={os.environ.get(OPT_OUT_ENV, '')!r} turned its start-up hook off), so solo-learn "
        f"would silently train its own MLP predictor. Either unset {OPT_OUT_ENV} (or set it to 1), or call "
        "directpred_plugin.solo.register() before building the model (for a script: "
        "python -m directpred_plugin.solo SCRIPT.py ...)."
    )


def install() -> None:
    """Put :class:`SoloMethodsFinder` first on ``sys.meta_path`` (once).

    Installed also when opted out: importing ``solo.methods`` then installs the guard.
    """
    if any(isinstance(f, SoloMethodsFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, SoloMethodsFinder())
