"""``directpred-bench``: one sub-command per benchmark."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Any, Dict, Optional, Sequence

#: Sub-command -> module providing ``add_arguments(parser)`` and ``run(args)``.
COMMANDS: Dict[str, str] = {
    "speed": "directpred_plugin.benchmarks.speed",
    "compare": "directpred_plugin.benchmarks.compare",
    "theory": "directpred_plugin.benchmarks.theory",
    "step": "directpred_plugin.benchmarks.step",
    "gpu-report": "directpred_plugin.benchmarks.gpu_report",
    "health-plot": "directpred_plugin.benchmarks.health",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help; module docstrings as written.

    Options whose help already states the default ("default: ...", "(default ...",
    "default per ..."), flags and options defaulting to None (their help says what None
    means) get no ``(default: ...)`` suffix. A default of 0 is shown like any other.
    """

    STATES_DEFAULT = re.compile(r"\(default\b|\bdefault:|\bdefault per\b|^default\b")

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if self.STATES_DEFAULT.search(text) or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar that follows the terminal's width, or 80 columns where the terminal reports none.

    ``dynamic_ncols`` alone gives a bar of zero width (only the counters, clipped) in a
    terminal that reports 0 columns (a fresh container's pty, some CI logs).
    """
    import shutil

    from tqdm.auto import tqdm

    columns = shutil.get_terminal_size(fallback=(0, 0)).columns
    if columns > 0:
        kwargs.setdefault("dynamic_ncols", True)
    else:
        kwargs.setdefault("ncols", 80)
    return tqdm(iterable, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="directpred-bench", description="DirectPred comparison benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=module.__doc__,
                                 formatter_class=HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for the tables that record it
    args._run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
