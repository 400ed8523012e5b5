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

Set ``DIRECTPRED_SOLO_AUTOREGISTER=0`` to turn this off (solo-learn then builds its own
predictors whatever the config says, unless ``register()`` is called explicitly).
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
        _register()

    def __getattr__(self, name: str) -> "Any":
        # get_source, get_resource_reader, ...: what tools ask of the real loader
        return getattr(self._loader, name)


class SoloMethodsFinder:
    """A ``sys.meta_path`` finder that only ever answers for ``solo.methods``.

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


def install() -> None:
    """Put :class:`SoloMethodsFinder` first on ``sys.meta_path`` (once), unless opted out."""
    if not enabled() or any(isinstance(f, SoloMethodsFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, SoloMethodsFinder())
