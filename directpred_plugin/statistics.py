"""The running statistics of a head: the open pool, its sum over ranks, and the EMA fold.

:class:`RunningStats` owns ``F_hat`` (``corr``), the running mean, the pool of the calls
of the open step and the counters of folded and skipped pools. Whether a pool is usable
(finite, and not underflowed) is decided on the device, after pooling and after the sum
over ranks, so the host never waits. :func:`fold_` is the one EMA step, a plain function.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .calls import autocast_disabled
from .distributed import all_reduce_sum_, world_size
from .functional import collapse_indicator
from .rules import all_finite, largest_magnitude

__all__ = ["Pool", "FoldResult", "RunningStats", "fold_"]


class Pool(NamedTuple):
    """Summed moments of rows ``x - shift``: ``sum (x-s)(x-s)^T``, ``sum (x-s)``, row count.

    The row count is NaN when a batch's second moments are not representable (underflow),
    so that such a pool is skipped like one with an overflow.
    """

    outer: Tensor
    total: Tensor
    rows: Tensor


class FoldResult(NamedTuple):
    """0-dim boolean tensors: was the pool folded, and was it skipped as unusable."""

    folded: Tensor
    skipped: Tensor


def fold_(
    corr: Tensor,
    mean: Optional[Tensor],
    num_updates: Tensor,
    pool: Pool,
    rho: float,
    shift: Optional[Tensor] = None,
) -> FoldResult:
    """One EMA step of ``corr`` (and ``mean``) from a pool, decided on the device.

    Without ``shift`` (raw moments): ``corr <- C`` on the first update, else
    ``corr <- rho corr + (1 - rho) C`` with ``C = outer / rows``. With ``shift`` (the pool
    holds moments of ``x - shift``) ``corr`` is the covariance ``F_hat - mu mu^T`` kept
    directly: with the batch covariance ``V`` and ``delta = batch mean - mu``,
    ``corr <- rho corr + (1 - rho) V + rho (1 - rho) delta delta^T`` and
    ``mu <- mu + (1 - rho) delta``, the same recurrence without its cancellation.

    A pool with no rows changes nothing; a pool with a non-finite entry or row count
    changes nothing and is reported as skipped, and so does one whose centred result would
    overflow. The pool's NaN/inf are zeroed in place.
    """
    finite = all_finite(pool.outer, pool.total, pool.rows)
    folded = finite & (pool.rows > 0)
    first = num_updates == 0
    zero = corr.new_zeros(())  # coefficients in the statistics' dtype, not the default one
    # NaN * 0 is NaN: zero them so an unused pool adds exactly nothing.
    pool.outer.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    total = pool.total.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if shift is not None:
        assert mean is not None, "centred moments need the running mean"
        # The mean's jump enters the covariance squared: a finite pool can still overflow it.
        inverse_rows = torch.where(folded, 1.0 / pool.rows.clamp_min(1), zero)
        offset = total * inverse_rows  # batch mean - shift
        delta = torch.where(folded, shift.nan_to_num(0.0, 0.0, 0.0) + offset - mean, zero)
        cross = torch.where(first, zero, zero + rho * (1.0 - rho))
        weight = torch.where(first, 1.0, zero + (1.0 - rho))
        update = (corr * torch.where(first, zero, rho) + pool.outer * (weight * inverse_rows)
                  - torch.outer(offset * weight, offset) + torch.outer(delta * cross, delta))
        new_mean = mean + delta * weight
        representable = all_finite(update, new_mean)
        finite, folded = finite & representable, folded & representable
        corr.copy_(torch.where(folded, update, corr))
        mean.copy_(torch.where(folded, new_mean, mean))
    else:
        keep = torch.where(folded, torch.where(first, zero, rho), 1.0)
        weight = torch.where(folded, torch.where(first, 1.0, zero + (1.0 - rho)), zero)
        per_row = torch.where(folded, weight / pool.rows.clamp_min(1), zero)
        corr.mul_(keep).addcmul_(pool.outer, per_row)
        if mean is not None:
            mean.mul_(keep).addcmul_(total, per_row)
    num_updates.add_(folded)
    return FoldResult(folded, ~finite)


class RunningStats(nn.Module):
    """``F_hat`` (or the covariance, with ``center``), the running mean, the open pool, the fold.

    :meth:`collect` adds a batch to the open pool (summed over ranks with ``sync_dist``),
    :meth:`fold` folds and empties it, :meth:`fold_batch` folds one batch as an update of
    its own. Buffers keep ``stats_dtype`` through ``.half()`` / ``.to(dtype)``.
    """

    corr: Tensor
    mean: Tensor
    pending_outer: Tensor
    pending_sum: Tensor
    pending_count: Tensor
    pending_shift: Tensor
    num_updates: Tensor
    num_skipped: Tensor
    last_collapse: Tensor

    _POOL = ("pending_outer", "pending_sum", "pending_count")

    def __init__(self, dim: int, *, rho: float, center: bool, stats_dtype: torch.dtype,
                 sync_dist: bool, process_group: Optional[Any]) -> None:
        super().__init__()
        self.rho, self.center, self.stats_dtype = rho, center, stats_dtype
        self.sync_dist, self.process_group = sync_dist, process_group
        self.register_buffer("corr", torch.zeros(dim, dim, dtype=stats_dtype))
        if center:
            self.register_buffer("mean", torch.zeros(dim, dtype=stats_dtype))
        self.register_buffer("pending_outer", torch.zeros(dim, dim, dtype=stats_dtype))
        self.register_buffer("pending_sum", torch.zeros(dim, dtype=stats_dtype))
        self.register_buffer("pending_count", torch.zeros((), dtype=stats_dtype))
        if center:
            self.register_buffer("pending_shift", torch.zeros(dim, dtype=stats_dtype))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.long))
        # a diagnostic of the local batch, not state that ranks or checkpoints share
        self.register_buffer("last_collapse", torch.full((), float("nan")), persistent=False)

    # ------------------------------------------------------------------ pool
    def pool(self) -> Pool:
        return Pool(self.pending_outer, self.pending_sum, self.pending_count)

    def collect(self, z: Tensor, *, opens_pool: bool) -> None:
        """Add the rows of ``z`` to the open pool (``opens_pool``: its first call since a fold)."""
        self._add(self.pool(), self.pending_shift if self.center else None, z, opens_pool)

    def fold(self) -> None:
        """Fold the open pool into the estimate and empty it."""
        self._fold(self.pool(), self.pending_shift if self.center else None)
        for name in self._POOL:
            getattr(self, name).zero_()

    def fold_batch(self, z: Tensor) -> None:
        """Fold the rows of ``z`` as an update of their own; the open pool is left as it is."""
        zeros = [torch.zeros_like(getattr(self, name)) for name in self._POOL]
        pool = Pool(*zeros)
        shift = torch.zeros_like(self.pending_shift) if self.center else None
        self._add(pool, shift, z, True)
        self._fold(pool, shift)

    def _fold(self, pool: Pool, shift: Optional[Tensor]) -> None:
        result = fold_(self.corr, self.mean if self.center else None, self.num_updates, pool, self.rho, shift)
        self.num_skipped.add_(result.skipped)

    def _add(self, pool: Pool, shift: Optional[Tensor], z: Tensor, opens_pool: bool) -> None:
        # moments in stats_dtype even inside the caller's autocast region (it would run x^T x in bf16)
        with torch.no_grad(), autocast_disabled(z.device.type):
            self._add_moments(pool, shift, z.detach().to(self.stats_dtype), opens_pool)

    def _add_moments(self, pool: Pool, shift: Optional[Tensor], x: Tensor, opens_pool: bool) -> None:
        rows = x.new_full((), x.shape[0])
        if x.shape[0]:
            largest = largest_magnitude(x)
            # Squares below the smallest normal number lose their digits (or vanish): such a
            # batch cannot be represented, like one whose squares overflow.
            underflow = (largest > 0) & (largest < math.sqrt(torch.finfo(x.dtype).tiny))
            rows = torch.where(underflow, float("nan"), rows)
            collapse = collapse_indicator(x, largest).to(self.last_collapse.dtype)
            self.last_collapse.copy_(torch.where(collapse.isfinite(), collapse, self.last_collapse))
        reduce = self.sync_dist and world_size(self.process_group) > 1
        if shift is not None:
            # The pool's shift is the mean (over ranks) of its first batch with rows, so that its
            # moments are small wherever the data sit; it changes only while the pool is empty.
            batch_sum = torch.cat([x.sum(dim=0), rows.nan_to_num(0.0).reshape(1)])
            if reduce:
                all_reduce_sum_(batch_sum, self.process_group)
            count = batch_sum[-1]
            empty = (pool.rows == 0) if not opens_pool else torch.ones((), dtype=torch.bool, device=x.device)
            batch_mean = batch_sum[:-1] / count.clamp_min(1)
            shift.copy_(torch.where(empty & (count > 0), batch_mean, torch.where(empty, self.mean, shift)))
            x = x - shift
        if reduce:  # summed over ranks as they join the pool: every rank holds the same pool
            moments = _all_reduce_pool(Pool(x.mT @ x, x.sum(dim=0), rows), self.process_group)
            for mine, theirs in zip(pool, moments):
                mine.add_(theirs)
        else:
            pool.outer.addmm_(x.mT, x)
            pool.total.add_(x.sum(dim=0))
            pool.rows.add_(rows)

    # ------------------------------------------------------------ bookkeeping
    def reset_running_stats(self) -> None:
        for name, buffer in self.named_buffers(recurse=False):
            if name == "last_collapse":
                buffer.fill_(float("nan"))
            else:
                buffer.zero_()

    def _apply(self, fn, recurse=True):
        # Statistics keep their dtype through .half()/.to(dtype): only their device follows.
        before = {name: buffer for name, buffer in self.named_buffers(recurse=False)}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self


def _all_reduce_pool(pool: Pool, group: Optional[Any]) -> Pool:
    """One collective for the whole pool: ``[outer | total | count]``."""
    dim = pool.total.shape[0]
    packed = torch.cat([pool.outer.flatten(), pool.total, pool.rows.reshape(1)])
    all_reduce_sum_(packed, group)
    return Pool(packed[: dim * dim].view(dim, dim), packed[dim * dim : dim * dim + dim], packed[-1])
