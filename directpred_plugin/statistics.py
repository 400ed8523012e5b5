"""The running statistics of a :class:`~directpred_plugin.DirectPredHead`: pooling and the EMA fold.

Batches add their moments to a pool (:func:`accumulate_`, or :func:`merge_` for moments
already summed over ranks); a pool is folded into the EMA once per update (:func:`fold_`)
with coefficients computed on the device, so that deciding whether the pool is usable,
after pooling and after the sum over ranks, never waits for the device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .rules import all_finite

__all__ = ["Pool", "FoldResult", "batch_moments", "accumulate_", "fold_"]


class Pool(NamedTuple):
    """Summed moments of the rows seen since the last update: ``sum z z^T``, ``sum z``, row count."""

    outer: Tensor
    total: Tensor
    rows: Tensor


class FoldResult(NamedTuple):
    """0-dim boolean tensors: was the pool folded, and was it skipped as non-finite."""

    folded: Tensor
    skipped: Tensor


def batch_moments(x: Tensor) -> Pool:
    """The moments of the rows of ``x`` as a pool of their own."""
    return Pool(x.mT @ x, x.sum(dim=0), x.new_full((), x.shape[0]))


def accumulate_(pool: Pool, x: Tensor) -> None:
    """Add the moments of the rows of ``x`` to ``pool`` in place (non-finite values included)."""
    pool.outer.addmm_(x.mT, x)
    pool.total.add_(x.sum(dim=0))
    pool.rows.add_(x.shape[0])


def merge_(pool: Pool, other: Pool) -> None:
    """Add the moments of ``other`` to ``pool`` in place."""
    for mine, theirs in zip(pool, other):
        mine.add_(theirs)


def fold_(
    corr: Tensor,
    mean: Optional[Tensor],
    num_updates: Tensor,
    pool: Pool,
    rho: float,
) -> FoldResult:
    """One EMA step of ``corr`` (and ``mean``) from a pool, decided on the device.

    The pool's non-finite entries are zeroed in place (the caller empties the pool next).

    ``corr <- pool.outer / rows`` on the first update, else
    ``corr <- rho * corr + (1 - rho) * pool.outer / rows``. A pool with no rows changes
    nothing; a pool with a non-finite entry (NaN/inf in a batch, or sums that overflowed
    only once pooled or summed over ranks) changes nothing and is reported as skipped.
    """
    finite = all_finite(pool.outer, pool.total)
    folded = finite & (pool.rows > 0)
    first = num_updates == 0
    zero = corr.new_zeros(())  # coefficients in the statistics' dtype, not the default one
    # A pool that is not folded gets (keep, take) = (1, 0).
    keep = torch.where(folded, torch.where(first, zero, rho), 1.0)
    take = torch.where(folded, torch.where(first, 1.0, zero + (1.0 - rho)) / pool.rows.clamp_min(1), zero)
    # Its NaN/inf are zeroed first (NaN * 0 is NaN). In place, no temporaries: the pool is
    # emptied after the fold anyway, and a folded pool is finite, so this leaves it as it is.
    pool.outer.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    corr.mul_(keep).addcmul_(pool.outer, take)
    if mean is not None:
        pool.total.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        mean.mul_(keep).addcmul_(pool.total, take)
    num_updates.add_(folded)
    return FoldResult(folded, ~finite)
