"""Closed-form predictor rules: how a correlation estimate becomes ``W_p``.

Every rule reads the *scale-normalised* statistics (:func:`normalise_statistics`), so a
predictor never depends on the scale of its input. :data:`VARIANTS` is the one registry of
rules; :class:`~directpred_plugin.DirectPredHead` looks ``variant=`` up there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

from .matmul_predictors import newton_schulz_fourth_root, newton_schulz_sqrt, stiefel_predictor, visser_sqrt

__all__ = [
    "RuleOptions",
    "Variant",
    "VARIANTS",
    "normalise_statistics",
    "directset_from_eigh",
    "directpred_rule",
    "directcopy_rule",
    "directset_rule",
]


@dataclass(frozen=True)
class RuleOptions:
    """The options a rule may read. ``eps=0, ridge=0`` gives every member's pure rule."""

    eps: float = 0.01
    """Added to each predictor eigenvalue (``eps_inside=False``) or to each ratio before the power."""
    alpha: float = 0.5
    """DirectSet power: ``p_j = (s_j / max s)^alpha + eps``; 1/2 is DirectPred, 1 is DirectCopy."""
    eps_inside: bool = False
    """Place ``eps`` inside the power, ``p_j = (s_j / max s + eps)^alpha`` (luckmatters' ``dyn_eps_inside``)."""


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


def directset_from_eigh(eigenvalues: Tensor, eigenvectors: Tensor, options: RuleOptions) -> Tensor:
    """``U diag(p) U^T`` with DirectSet's ``p`` from an eigendecomposition ``U diag(s) U^T``."""
    ratio = eigenvalues.clamp_min(0) * inverse_or_zero(eigenvalues.max())
    if options.eps_inside:
        p = (ratio + options.eps).pow(options.alpha)
    else:
        p = ratio.pow(options.alpha) + options.eps
    return (eigenvectors * p) @ eigenvectors.mT


def directset_rule(stats: Tensor, options: RuleOptions) -> Tensor:
    """DirectSet(alpha) (Wang et al. 2021, arXiv 2110.04947): ``p_j = (max(s_j, 0) / max s)^alpha + eps``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(stats)
    return directset_from_eigh(eigenvalues, eigenvectors, options)


def directpred_rule(stats: Tensor, options: RuleOptions) -> Tensor:
    """DirectPred (Tian, Chen & Ganguli, ICML 2021, Eq. 18): DirectSet with ``alpha = 1/2``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(stats)
    return directset_from_eigh(eigenvalues, eigenvectors, _with_alpha(options, 0.5))


def directcopy_rule(stats: Tensor, options: RuleOptions) -> Tensor:
    """DirectCopy (Wang et al. 2021): ``W_p = F / lambda_max(F) + eps * I`` (no eigenvectors needed)."""
    top = torch.linalg.eigvalsh(stats).max()
    eye = torch.eye(stats.shape[-1], dtype=stats.dtype, device=stats.device)
    return stats * inverse_or_zero(top) + options.eps * eye  # with alpha = 1, eps inside or out is the same


def _with_alpha(options: RuleOptions, alpha: float) -> RuleOptions:
    if options.alpha == alpha:
        return options
    return RuleOptions(eps=options.eps, alpha=alpha, eps_inside=options.eps_inside)


@dataclass(frozen=True)
class Variant:
    """One member of the closed-form family; ``variant(stats, eps)`` evaluates it exactly."""

    rule: Callable[[Tensor, RuleOptions], Tensor]
    """The exact rule: normalised statistics and options to ``W_p``."""
    spectral_power: Optional[Callable[[RuleOptions], Optional[float]]]
    """For spectral rules ``p_j = (s_j / max s)^a + eps``: the power ``a`` for these options
    (an iterative refresh approximates ``a`` in {1/2, 1}); None for rules that are not of
    that form or that already use matrix products only."""
    summary: str

    def power(self, options: RuleOptions) -> Optional[float]:
        """The spectral power ``a`` for these options, or None (see ``spectral_power``)."""
        return self.spectral_power(options) if self.spectral_power is not None else None

    def __call__(self, stats: Tensor, options: Union[float, RuleOptions] = RuleOptions()) -> Tensor:
        """The exact ``W_p`` for (unnormalised) statistics; ``options`` may be just ``eps``."""
        if not isinstance(options, RuleOptions):
            options = RuleOptions(eps=float(options))
        return self.rule(normalise_statistics(stats), options)


def _fixed_power(alpha: float) -> Callable[[RuleOptions], Optional[float]]:
    return lambda options: alpha if alpha == 1.0 or not options.eps_inside else None


def _directset_power(options: RuleOptions) -> Optional[float]:
    return None if options.eps_inside else options.alpha


def _matmul_rule(predictor: Callable[[Tensor], Tensor]) -> Callable[[Tensor, RuleOptions], Tensor]:
    """An Edge-of-Orthogonality predictor as a rule: ``P(stats) + eps I`` (``eps = 0``: the pure rule)."""

    def rule(stats: Tensor, options: RuleOptions) -> Tensor:
        weight = predictor(stats)
        if options.eps:
            weight = weight + options.eps * torch.eye(stats.shape[-1], dtype=stats.dtype, device=stats.device)
        return weight

    rule.__name__ = rule.__qualname__ = f"{predictor.__name__}_rule"
    rule.__doc__ = f"{predictor.__name__} on the normalised statistics, plus ``eps * I``."
    return rule


#: Closed-form predictor rules by name; ``DirectPredHead(variant=...)`` looks them up here.
VARIANTS: Dict[str, Variant] = {
    "directpred": Variant(directpred_rule, _fixed_power(0.5), "U diag(sqrt(s / max s) + eps) U^T"),
    "directcopy": Variant(directcopy_rule, _fixed_power(1.0), "F / lambda_max + eps I"),
    "directset": Variant(directset_rule, _directset_power, "U diag((s / max s)^alpha + eps) U^T"),
    # Richemond et al., "The Edge of Orthogonality", ICML 2023: matrix products only
    "ns": Variant(_matmul_rule(newton_schulz_sqrt), None, "coupled Newton-Schulz, 9 steps: ~ F^(1/2)"),
    "ns2": Variant(_matmul_rule(newton_schulz_fourth_root), None, "two Newton-Schulz passes, 7 steps each: ~ F^(1/4)"),
    "stiefel": Variant(_matmul_rule(stiefel_predictor), None, "Newton-Schulz on F^T F: B F^T / ||B||_F, B ~ (F^T F)^(-1/2)"),
    "visser": Variant(_matmul_rule(visser_sqrt), None, "Visser iteration P <- P + eta (F - P^2), 9 steps: ~ F^(1/2)"),
}
