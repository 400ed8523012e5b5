"""The one collective the head needs (summing its batch statistics over ranks), and who the ranks are."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def initialized() -> bool:
    """Whether ``torch.distributed`` is available and its default process group initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Optional[Any] = None) -> int:
    """Number of ranks in ``group``; 1 when ``torch.distributed`` is unavailable or not initialised."""
    return dist.get_world_size(group) if initialized() else 1


def rank(group: Optional[Any] = None) -> int:
    """This process's rank in ``group``; 0 when ``torch.distributed`` is unavailable or not initialised."""
    return dist.get_rank(group) if initialized() else 0


def all_reduce_sum_(tensor: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """Sum ``tensor`` in place over the ranks of ``group`` (no-op on a single process)."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
