"""The running statistics of a head: the open pool, its sum over ranks, and the EMA fold.

:class:`RunningStats` owns ``F_hat`` (``corr``), the running mean, the pool of the calls
of the open step and the counters of folded and skipped pools. Whether a pool is usable
(finite, and not underflowed) is decided on the device, after pooling and after the sum
over ranks, so the host never waits. :func:`fold_` is the one EMA step, a plain function.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .calls import autocast_disabled
from .distributed import all_reduce_sum_, initialized, rank, world_size
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

    :meth:`collect` adds a batch to the open pool, :meth:`fold` sums the pool over ranks
    (``sync_dist``: one collective per pool, two with ``center``) and folds and empties it,
    :meth:`fold_batch` folds one batch as an update of its own. The pool is this rank's own
    until the fold, so it is not a buffer (DDP's buffer broadcast would overwrite it with
    rank 0's); it is saved as extra state. Buffers keep ``stats_dtype`` through
    ``.half()`` / ``.to(dtype)``.
    """

    corr: Tensor
    mean: Tensor
    num_updates: Tensor
    num_skipped: Tensor
    last_collapse: Tensor

    def __init__(self, dim: int, *, rho: float, center: bool, stats_dtype: torch.dtype,
                 sync_dist: bool, process_group: Optional[Any]) -> None:
        super().__init__()
        self.rho, self.center, self.stats_dtype = rho, center, stats_dtype
        self.sync_dist, self.process_group = sync_dist, process_group
        self.register_buffer("corr", torch.zeros(dim, dim, dtype=stats_dtype))
        if center:
            self.register_buffer("mean", torch.zeros(dim, dtype=stats_dtype))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.long))
        # a diagnostic of the local batch, not state that ranks or checkpoints share
        self.register_buffer("last_collapse", torch.full((), float("nan")), persistent=False)
        self._pool, self._shift = self._empty_pool(torch.device("cpu"))
        self._unclaimed: Optional[Pool] = None  # a loaded pool not yet known to be this rank's

    # ------------------------------------------------------------------ pool
    def _empty_pool(self, device: torch.device) -> Tuple[Pool, Optional[Tensor]]:
        dim, dtype = self.corr.shape[0], self.stats_dtype
        pool = Pool(torch.zeros(dim, dim, dtype=dtype, device=device), torch.zeros(dim, dtype=dtype, device=device),
                    torch.zeros((), dtype=dtype, device=device))
        return pool, (torch.zeros(dim, dtype=dtype, device=device) if self.center else None)

    def pool(self) -> Pool:
        """This rank's open pool (with ``center``, moments about the pool's shift)."""
        return self._pool

    def reduces(self) -> bool:
        """Whether a fold sums the pool over ranks (``sync_dist`` and more than one rank)."""
        return self.sync_dist and world_size(self.process_group) > 1

    def collect(self, z: Tensor, *, opens_pool: bool) -> None:
        """Add the rows of ``z`` to the open pool (``opens_pool``: its first call since a fold)."""
        self._add(self._pool, self._shift, z, opens_pool)

    def fold(self) -> None:
        """Sum the open pool over ranks, fold it into the estimate and empty it."""
        pool, shift = self._pool, self._shift
        if self._unclaimed is not None:  # loaded before the ranks were known: rank 0's alone
            if self.reduces() and rank(self.process_group) != 0:
                for mine, loaded in zip(pool, self._unclaimed):
                    mine.sub_(loaded)
            self._unclaimed = None
        self._fold(pool, shift)
        for tensor in pool:
            tensor.zero_()

    def fold_batch(self, z: Tensor) -> None:
        """Fold the rows of ``z`` as an update of their own; the open pool is left as it is."""
        pool, shift = self._empty_pool(z.device)
        self._add(pool, shift, z, True)
        self._fold(pool, shift)

    def _fold(self, pool: Pool, shift: Optional[Tensor]) -> None:
        if self.reduces():
            pool, shift = _all_reduce_pool(pool, shift, self.mean if self.center else None, self.process_group)
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
        if shift is not None:
            # The pool's shift is the mean of its first batch with rows, so that its moments are
            # small wherever the data sit; it changes only while the pool is empty.
            if opens_pool:
                empty = torch.ones((), dtype=torch.bool, device=x.device)
            else:
                empty = pool.rows == 0
            if x.shape[0]:
                shift.copy_(torch.where(empty, x.sum(dim=0) / x.shape[0], shift))
            else:
                shift.copy_(torch.where(empty, self.mean, shift))
            x = x - shift
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
        self._pool, self._shift = self._empty_pool(self.corr.device)
        self._unclaimed = None

    def get_extra_state(self) -> Dict[str, Any]:
        pool = dict(self._pool._asdict())
        if self._shift is not None:
            pool["shift"] = self._shift
        return {"pool": {name: tensor.detach().clone() for name, tensor in pool.items()}}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        saved = state["pool"]
        device = self.corr.device
        pool = Pool(*(saved[name].to(device=device, dtype=self.stats_dtype).clone() for name in Pool._fields))
        shift = saved["shift"].to(device=device, dtype=self.stats_dtype).clone() if self.center else None
        # A saved pool is the whole pool of its run: rank 0 continues it, the other ranks start empty.
        self._unclaimed = None
        if self.reduces():
            if rank(self.process_group) != 0:
                for tensor in pool:
                    tensor.zero_()
        elif self.sync_dist and not initialized():  # the ranks are not known yet: decided at the first fold
            self._unclaimed = Pool(*(tensor.clone() for tensor in pool))
        self._pool, self._shift = pool, shift

    def _apply(self, fn, recurse=True):
        # Statistics keep their dtype through .half()/.to(dtype): only their device follows.
        before = {name: buffer for name, buffer in self.named_buffers(recurse=False)}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        device = self.corr.device
        self._pool = Pool(*(tensor.to(device) for tensor in self._pool))
        if self._shift is not None:
            self._shift = self._shift.to(device)
        if self._unclaimed is not None:
            self._unclaimed = Pool(*(tensor.to(device) for tensor in self._unclaimed))
        return self


def _all_reduce_pool(pool: Pool, shift: Optional[Tensor], mean: Optional[Tensor],
                     group: Optional[Any]) -> Tuple[Pool, Optional[Tensor]]:
    """The pool summed over ranks, in one collective ``[outer | total | rows]``.

    With ``shift`` (each rank's moments are about its own shift) a first, small collective
    finds the common shift (the row-weighted mean of the ranks' shifts; the running mean if
    no rank has rows) and each rank moves its moments to it before they are summed.
    """
    dim = pool.total.shape[0]
    if shift is not None:
        assert mean is not None
        rows = pool.rows.nan_to_num(0.0)  # an underflowed pool stays NaN in the sum below
        weighted = torch.cat([shift * rows, rows.reshape(1)])
        all_reduce_sum_(weighted, group)
        count = weighted[-1]
        common = torch.where(count > 0, weighted[:-1] / count.clamp_min(1), mean)
        # sum (x - c)(x - c)^T = sum (x - s)(x - s)^T + T d^T + d T^T + n d d^T, with d = s - c
        delta = torch.where(rows > 0, shift - common, torch.zeros_like(shift))
        outer = pool.outer + torch.outer(pool.total, delta) + torch.outer(delta, pool.total + rows * delta)
        pool = Pool(outer, pool.total + rows * delta, pool.rows)
        shift = common
    packed = torch.cat([pool.outer.flatten(), pool.total, pool.rows.reshape(1)])
    all_reduce_sum_(packed, group)
    return Pool(packed[: dim * dim].view(dim, dim), packed[dim * dim : dim * dim + dim], packed[-1]), shift
