"""``directpred-bench``: one sub-command per benchmark."""

from __future__ import annotations

import argparse
import importlib
from typing import Dict, Optional, Sequence

#: Sub-command -> module providing ``add_arguments(parser)`` and ``run(args)``.
COMMANDS: Dict[str, str] = {
    "speed": "directpred_plugin.benchmarks.speed",
    "compare": "directpred_plugin.benchmarks.compare",
    "theory": "directpred_plugin.benchmarks.theory",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help; module docstrings as written.

    Options whose help already states the default, flags and options defaulting to None
    (their help says what None means) get no ``(default: ...)`` suffix.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False) or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


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
    args = build_parser().parse_args(argv)
    args._run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
