"""Closed-form predictor weights and the diagnostics used in the DirectPred paper.

Everything here is a pure function of tensors, so it can be tested and reused
without a :class:`~directpred_plugin.DirectPredHead`.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

WeightFn = Callable[[Tensor, float], Tensor]


def _inverse_top(top: Tensor) -> Tensor:
    """``1 / top`` where ``top > 0``, else 0: an all-zero correlation maps to ``eps * I``."""
    return torch.where(top > 0, top.clamp_min(torch.finfo(top.dtype).tiny).reciprocal(), 0.0)


def directpred_from_eigh(eigenvalues: Tensor, eigenvectors: Tensor, eps: float) -> Tensor:
    """DirectPred weight from an eigendecomposition ``F = U diag(s) U^T``.

    ``p_j = sqrt(max(s_j, 0) / max_k s_k) + eps`` and ``W_p = U diag(p) U^T``.
    """
    scale = _inverse_top(eigenvalues.max())
    p = (eigenvalues.clamp_min(0) * scale).sqrt() + eps
    return (eigenvectors * p) @ eigenvectors.mT


def directpred_weight(corr: Tensor, eps: float) -> Tensor:
    """DirectPred predictor (Tian, Chen & Ganguli, ICML 2021, Eq. 18) for a correlation ``corr``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(corr)
    return directpred_from_eigh(eigenvalues, eigenvectors, eps)


def directcopy_weight(corr: Tensor, eps: float) -> Tensor:
    """DirectCopy predictor (Wang et al., 2021): ``W_p = F / lambda_max(F) + eps * I``."""
    top = torch.linalg.eigvalsh(corr).max()
    eye = torch.eye(corr.shape[-1], dtype=corr.dtype, device=corr.device)
    return corr * _inverse_top(top) + eps * eye


#: Closed-form predictor rules by name; ``DirectPredHead(variant=...)`` looks them up here.
VARIANTS: Dict[str, WeightFn] = {
    "directpred": directpred_weight,
    "directcopy": directcopy_weight,
}


def batch_outer_sum(z: Tensor) -> Tensor:
    """Sum of outer products ``z^T z`` of a ``(batch, dim)`` tensor (not divided by batch)."""
    return z.mT @ z


def collapse_indicator(z: Tensor) -> Tensor:
    """Mean over dimensions of the std of l2-normalised rows of ``z``.

    Uses the population std, so the value lies in ``[0, 1/sqrt(dim)]``: 0 means every
    sample maps to the same direction (complete collapse), ``1/sqrt(dim)`` is reached by
    isotropic outputs. The same statistic is used by lightly's BYOL/SimSiam examples.
    """
    normalized = F.normalize(z.detach().float(), dim=1)
    return normalized.std(dim=0, correction=0).mean()


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
