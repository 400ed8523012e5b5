"""``directpred-bench`` from inside the package: the progress bar the benchmarks share, and the
command line itself (defined in the top-level module ``_directpred_bench``, which parses
without importing torch), so that ``python -m directpred_plugin.benchmarks.cli`` runs it too."""

from __future__ import annotations

from typing import Any

from _directpred_bench import COMMANDS, HelpFormatter, build_parser, main

__all__ = ["COMMANDS", "HelpFormatter", "build_parser", "main", "progress_bar"]


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


if __name__ == "__main__":
    raise SystemExit(main())
