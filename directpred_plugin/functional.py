"""Closed-form predictor weights and the diagnostics used in the DirectPred paper.

Everything here is a pure function of tensors, so it can be tested and reused
without a :class:`~directpred_plugin.DirectPredHead`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .rules import VARIANTS, largest_magnitude


def directpred_weight(corr: Tensor, eps: float) -> Tensor:
    """DirectPred predictor (Tian, Chen & Ganguli, ICML 2021, Eq. 18) for a correlation ``corr``."""
    return VARIANTS["directpred"](corr, eps)


def directcopy_weight(corr: Tensor, eps: float) -> Tensor:
    """DirectCopy predictor (Wang et al., 2021): ``W_p = F / lambda_max(F) + eps * I``."""
    return VARIANTS["directcopy"](corr, eps)


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
    w64 = weight.detach().to(device=corr64.device, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(corr64)
    mapped = w64 @ eigenvectors
    cosine = (eigenvectors * mapped).sum(dim=0).abs() / mapped.norm(dim=0).clamp_min(1e-300)
    weights = eigenvalues.clamp_min(0)
    return (weights * cosine).sum() / weights.sum()


def effective_rank(eigenvalues: Tensor) -> Tensor:
    """``exp`` of the entropy of the normalised non-negative spectrum (Roy & Vetterli, 2007)."""
    p = eigenvalues.clamp_min(0)
    p = p / p.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())
