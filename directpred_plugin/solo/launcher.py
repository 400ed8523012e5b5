"""Run an unmodified solo-learn script (``main_pretrain.py``, ...) with DirectPred registered.

``python -m directpred_plugin.solo SCRIPT.py [ARGS...]`` registers the adapter, then runs
the script as ``__main__`` with ``sys.argv = [SCRIPT.py, *ARGS]``, as ``python SCRIPT.py
ARGS`` would (hydra still finds ``--config-path`` relative to the script).

Lightning starts DDP workers by re-running the command of the main module: ``python -m
<__main__.__spec__.name> <argv[1:]>``, or ``python <argv[0]> ...`` when ``__spec__`` is
``None``. A plain ``runpy.run_path`` leaves ``__spec__`` at ``None``, so the workers would
run the bare script without the registration. The launcher instead gives the script a
``__main__`` module whose ``__spec__`` names this launcher and hands the script path to the
workers in `SCRIPT_ENV`: each worker re-enters the launcher, registers and runs the
same script.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import os
import sys
import types
from typing import List, Mapping, Optional, Sequence, Tuple

#: Environment variable carrying the absolute script path to worker processes.
SCRIPT_ENV = "DIRECTPRED_SOLO_SCRIPT"
#: The module Lightning's workers re-run (``python -m directpred_plugin.solo``).
LAUNCHER_MODULE = "directpred_plugin.solo"

USAGE = f"""usage: python -m {LAUNCHER_MODULE} SCRIPT.py [ARGS...]

Runs a solo-learn script (e.g. main_pretrain.py) with `method_kwargs.predictor: directpred`
available, in this process and in the DDP workers Lightning starts. Example:

  python -m {LAUNCHER_MODULE} main_pretrain.py --config-path scripts/pretrain/cifar --config-name byol.yaml \\
      +method_kwargs.predictor=directpred
"""


class UsageError(ValueError):
    """The command line names no script to run."""


def resolve_script(args: Sequence[str], environ: Mapping[str, str]) -> Tuple[str, List[str]]:
    """``(absolute script path, script arguments)`` from the launcher's arguments.

    A first argument ending in ``.py`` is the script (it must exist); otherwise this is a
    worker started by Lightning, which passes only the script's arguments, and the script
    comes from `SCRIPT_ENV`.
    """
    if args and args[0].endswith(".py"):
        script = os.path.abspath(args[0])
        if not os.path.isfile(script):
            raise UsageError(f"no such script: {args[0]!r}")
        return script, list(args[1:])
    inherited = environ.get(SCRIPT_ENV)
    if inherited:
        return inherited, list(args)
    raise UsageError(f"expected a script (SCRIPT.py) as the first argument, got {list(args)!r}")


def run_script(script: str, args: Sequence[str]) -> None:
    """Register DirectPred with solo-learn, then execute ``script`` as ``__main__``."""
    from . import register

    os.environ[SCRIPT_ENV] = script  # inherited by the workers Lightning starts
    register()
    rank = os.environ.get("LOCAL_RANK")
    print(
        f"{LAUNCHER_MODULE}: DirectPred registered with solo-learn "
        f"(pid {os.getpid()}{f', LOCAL_RANK {rank}' if rank else ''}); running {script}",
        file=sys.stderr,
        flush=True,
    )

    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__spec__ = importlib.machinery.ModuleSpec(LAUNCHER_MODULE, None)
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT.py` sets it
    with open(script, encoding="utf-8") as f:
        code = compile(f.read(), script, "exec")
    exec(code, main.__dict__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        script, script_args = resolve_script(args, os.environ)
    except UsageError as err:
        print(f"{LAUNCHER_MODULE}: {err}\n\n{USAGE}", file=sys.stderr)
        return 2
    from . import log_to_stderr

    log_to_stderr()
    run_script(script, script_args)
    return 0
