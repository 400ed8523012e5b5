"""How a benchmark process runs: its torch thread count and its progress bars.

Both are set per command (``--threads``, ``--no-progress``), the same way for every command.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, restored after; None or 0 keeps PyTorch's default."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar that follows the terminal's width, or 80 columns where the terminal reports none.

    ``dynamic_ncols`` alone gives a bar of zero width (only the counters, clipped) in a
    terminal that reports 0 columns (a fresh container's pty, some CI logs).
    """
    from tqdm.auto import tqdm

    if shutil.get_terminal_size(fallback=(0, 0)).columns > 0:
        kwargs.setdefault("dynamic_ncols", True)
    else:
        kwargs.setdefault("ncols", 80)
    return tqdm(iterable, **kwargs)
