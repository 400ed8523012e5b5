"""The head's arithmetic as pure functions: the moments of a batch, the EMA fold, the pool's
sum over ranks, the normalisation every rule reads, and the diagnostics of the DirectPred paper.

Nothing here holds state; `DirectPredHead` owns the tensors these
functions read and write, as ``torch.nn.BatchNorm`` does for ``F.batch_norm``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .distributed import all_reduce_sum_


def inverse_or_zero(value: Tensor) -> Tensor:
    """``1 / value`` where ``value > 0``, else 0: an all-zero estimate maps to ``eps * I``."""
    return torch.where(value > 0, value.clamp_min(torch.finfo(value.dtype).tiny).reciprocal(), 0.0)


def all_finite(*tensors: Tensor) -> Tensor:
    """``isfinite(t).all()`` over all ``tensors`` (0-dim bool), one reading pass each, no mask
    (0-dim tensors are their own extremes).

    NaN and +-inf reach a tensor's min or max, and ``v * 0`` is 0 exactly when ``v`` is
    finite (a difference of the extremes could overflow instead). ``isfinite`` would
    write and re-read a mask as large as the tensor, several times over.
    """
    extremes = [v for t in tensors if t.numel() for v in (torch.aminmax(t) if t.dim() else (t,))]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device)
    return torch.stack([v.to(extremes[0].dtype) for v in extremes]).mul_(0).sum() == 0


def largest_magnitude(x: Tensor) -> Tensor:
    """``max |x_ij|`` in one reading pass (no ``abs`` copy)."""
    low, high = torch.aminmax(x)
    return torch.maximum(-low, high)


def normalise_statistics(stats: Tensor, ridge: float = 0.0) -> Tensor:
    """``stats / max|stats_ij| + ridge * I``: the matrix every rule reads.

    The largest absolute entry is exact in floating point (no sum, no square that could
    underflow or overflow) and, for a PSD matrix, lies between ``lambda_max / dim`` and
    ``lambda_max``. So the normalised matrix has eigenvalues in ``[0, dim]`` whatever the
    scale of the input, as long as ``stats`` itself is representable.
    """
    largest = largest_magnitude(stats)
    # a true division: a subnormal largest entry has no representable reciprocal
    normalised = stats / torch.where(largest > 0, largest, torch.ones_like(largest))
    if ridge:
        normalised = normalised + ridge * torch.eye(stats.shape[-1], dtype=stats.dtype, device=stats.device)
    return normalised


def collapse_indicator(z: Tensor, largest: Optional[Tensor] = None) -> Tensor:
    """Mean over dimensions of the std of l2-normalised rows of ``z`` (float32, 0-dim).

    Uses the population std, so the value lies in ``[0, 1/sqrt(dim)]``: 0 means every
    sample maps to the same direction (complete collapse), ``1/sqrt(dim)`` is reached by
    isotropic outputs. The same statistic is used by lightly's BYOL/SimSiam examples.
    Scale-invariant: the rows are divided by the batch's largest entry (in their own dtype)
    before anything is squared, so ``c * z`` reads as ``z`` for any finite ``c != 0``.
    Two passes over the centred rows, as ``std`` does, without its slow column reduction:
    this runs on every training call of the head (which passes ``largest``, ``max|z_ij|``,
    that it needs anyway).
    """
    rows = z.detach()
    if rows.dtype not in (torch.float32, torch.float64):  # scaling in half precision would round
        rows, largest = rows.float(), None
    if rows.numel():
        if largest is None:
            largest = largest_magnitude(rows)
        rows = rows / torch.where(largest > 0, largest, 1.0)
    rows = rows.float()
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    normalized = rows / norms.clamp_min(1e-12)  # the floor of torch.nn.functional.normalize
    normalized -= normalized.mean(dim=0)
    return normalized.square_().mean(dim=0).sqrt_().mean()


def eigenspace_alignment(weight: Tensor, corr: Tensor) -> Tensor:
    """How well ``weight`` maps the eigenvectors of ``corr`` onto themselves, in ``[0, 1]``.

    For every eigenvector ``u_j`` of ``corr`` this takes ``|cos(W u_j, u_j)|``, which is 1
    exactly when ``u_j`` is also an eigenvector of ``W``, and averages it with weights
    ``max(s_j, 0)`` so that directions carrying no signal do not count. This is the
    alignment the paper tracks between the predictor and the correlation of its input;
    a DirectPred weight has alignment 1 by construction. Returns NaN when ``corr`` has no
    positive eigenvalue.
    """
    corr64 = corr.detach().to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(corr64)
    return alignment_from_eigh(weight, eigenvalues, eigenvectors)


def alignment_from_eigh(weight: Tensor, eigenvalues: Tensor, eigenvectors: Tensor) -> Tensor:
    """`eigenspace_alignment` from an eigendecomposition of ``corr`` already at hand (float64)."""
    w64 = weight.detach().to(device=eigenvectors.device, dtype=torch.float64)
    mapped = w64 @ eigenvectors
    cosine = (eigenvectors * mapped).sum(dim=0).abs() / mapped.norm(dim=0).clamp_min(1e-300)
    weights = eigenvalues.clamp_min(0)
    return (weights * cosine).sum() / weights.sum()


def effective_rank(eigenvalues: Tensor) -> Tensor:
    """``exp`` of the entropy of the normalised non-negative spectrum (Roy & Vetterli, 2007)."""
    p = eigenvalues.clamp_min(0)
    p = p / p.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def rankme(eigenvalues: Tensor) -> Tensor:
    """RankMe (Garrido et al., ICML 2023) from the eigenvalues of ``F_hat = E[z z^T]``.

    The singular values of a batch of projections are the square roots of the eigenvalues of
    its correlation, so RankMe, ``exp`` of the entropy of the normalised singular values, is
    read off ``F_hat`` without the rows: 1 for projections on a line, ``dim`` for isotropic ones.
    """
    return effective_rank(eigenvalues.clamp_min(0).sqrt())


# ----------------------------------------------------------------- the running statistics
class Pool(NamedTuple):
    """Summed moments of rows ``x - shift``: ``sum (x-s)(x-s)^T``, ``sum (x-s)``, row count.

    The row count is NaN when a batch's second moments are not representable (underflow),
    so that such a pool is skipped like one with an overflow.
    """

    outer: Tensor
    total: Tensor
    rows: Tensor


def empty_pool(dim: int, dtype: torch.dtype, device: torch.device) -> Pool:
    return Pool(torch.zeros(dim, dim, dtype=dtype, device=device), torch.zeros(dim, dtype=dtype, device=device),
                torch.zeros((), dtype=dtype, device=device))


def pool_moments_(pool: Pool, shift: Optional[Tensor], x: Tensor, *, opens_pool: bool,
                  mean: Optional[Tensor]) -> None:
    """Add the rows of ``x`` (already in the statistics' dtype) to ``pool``, decided on the device.

    With ``shift`` (``center``) the pool holds moments about the mean of its first batch with
    rows, so that they stay small wherever the data sit; the shift changes only while the pool
    is empty (``opens_pool``: the first call since a fold), and is the running ``mean`` for a pool
    whose batches have no rows.
    """
    rows = x.new_full((), x.shape[0])
    if x.shape[0]:
        largest = largest_magnitude(x)
        # Squares below the smallest normal number lose their digits (or vanish): such a batch
        # cannot be represented, like one whose squares overflow.
        underflow = (largest > 0) & (largest < math.sqrt(torch.finfo(x.dtype).tiny))
        rows = torch.where(underflow, float("nan"), rows)
    if shift is not None:
        assert mean is not None, "centred moments need the running mean"
        empty = torch.ones((), dtype=torch.bool, device=x.device) if opens_pool else pool.rows == 0
        batch_shift = x.sum(dim=0) / x.shape[0] if x.shape[0] else mean
        shift.copy_(torch.where(empty, batch_shift, shift))
        x = x - shift
    pool.outer.addmm_(x.mT, x)
    pool.total.add_(x.sum(dim=0))
    pool.rows.add_(rows)


def fold_(corr: Tensor, mean: Optional[Tensor], num_updates: Tensor, pool: Pool, rho: float,
          shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One EMA step of ``corr`` (and ``mean``) from a pool; returns 0-dim (folded, skipped).

    Without ``shift`` (raw moments): ``corr <- C`` on the first update, else
    ``corr <- rho corr + (1 - rho) C`` with ``C = outer / rows``. With ``shift`` (the pool
    holds moments of ``x - shift``) ``corr`` is the covariance ``F_hat - mu mu^T`` kept
    directly: with the batch covariance ``V`` and ``delta = batch mean - mu``,
    ``corr <- rho corr + (1 - rho) V + rho (1 - rho) delta delta^T`` and
    ``mu <- mu + (1 - rho) delta``, the same recurrence without its cancellation.

    A pool with no rows changes nothing; a pool with a non-finite entry or row count changes
    nothing and is reported as skipped, and so does one whose centred result would overflow.
    The pool's NaN/inf are zeroed in place. Nothing is read on the host.
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
    return folded, ~finite


def all_reduce_pool(pool: Pool, shift: Optional[Tensor], mean: Optional[Tensor],
                    group: Optional[Any]) -> Tuple[Pool, Optional[Tensor]]:
    """The pool summed over ranks, in one collective ``[outer | total | rows]``.

    With ``shift`` (each rank's moments are about its own shift) a first, small collective
    finds the common shift (the row-weighted mean of the ranks' shifts; the running mean if
    no rank has rows) and each rank moves its moments to it exactly before they are summed.
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
