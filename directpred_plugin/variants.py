"""The closed-form family: one name table (`VARIANTS`) and the rules behind its names.

Each member maps the scale-normalised correlation estimate to ``W_p``: the spectral rules
(DirectPred, DirectCopy, DirectSet) through an eigendecomposition, the Edge-of-Orthogonality
rules (``ns``, ``ns2``, ``stiefel``, ``visser``) through matrix products only. A name also
stands for the head options it is meant with (`variant_defaults`), so
``DirectPredHead(dim, variant=name)`` is that member as its paper runs it.

- Tian, Chen & Ganguli, "Understanding self-supervised learning dynamics without contrastive
  pairs", ICML 2021, https://arxiv.org/abs/2102.06810 (DirectPred, the hybrid)
- Wang, Chen, Du & Tian, "Towards demystifying representation learning with non-contrastive
  self-supervision", 2021, https://arxiv.org/abs/2110.04947 (DirectCopy, DirectSet)
- Richemond, Tam, Tang, Strub, Piot & Hill, "The Edge of Orthogonality: A Simple View of What
  Makes BYOL Tick", ICML 2023, https://arxiv.org/abs/2302.04817 (``ns``, ``ns2``, ``stiefel``,
  ``visser``, `neumann_predictor`)

The matrix-product functions are pure (inputs untouched), keep the input's device and dtype
and read nothing on the host. Each iterate is a polynomial in ``Sigma``: it shares its
eigenvectors, and with a fixed number of steps eigenvalues far below ``||Sigma||_F`` are not
yet converged (a smooth, monotone stand-in for the root that stays near zero there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .functional import inverse_or_zero, normalise_statistics

__all__ = [
    "VARIANTS",
    "Variant",
    "RuleOptions",
    "variant_defaults",
    "member_options",
    "directpred_weight",
    "directcopy_weight",
    "directset_from_eigh",
    "newton_schulz_sqrt",
    "newton_schulz_fourth_root",
    "stiefel_predictor",
    "visser_sqrt",
    "neumann_predictor",
]

# Keeps the normalisation finite for an all-zero Sigma (the result is then zero) without
# a host-side check; far below any norm a real correlation has in float32.
_TINY_NORM = 1e-30


@dataclass(frozen=True)
class RuleOptions:
    """The options a rule may read. ``eps=0`` gives every member's pure rule."""

    eps: float = 0.01
    """Added to each predictor eigenvalue (``eps_inside=False``) or to each ratio before the power."""
    alpha: float = 0.5
    """DirectSet power: ``p_j = (s_j / max s)^alpha + eps``; 1/2 is DirectPred, 1 is DirectCopy."""
    eps_inside: bool = False
    """Place ``eps`` inside the power, ``p_j = (s_j / max s + eps)^alpha`` (luckmatters' ``dyn_eps_inside``)."""


# ---------------------------------------------------------------------- spectral rules
def directset_from_eigh(eigenvalues: Tensor, eigenvectors: Tensor, options: RuleOptions) -> Tensor:
    """``U diag(p) U^T`` with DirectSet's ``p`` from an eigendecomposition ``U diag(s) U^T``."""
    ratio = eigenvalues.clamp_min(0) * inverse_or_zero(eigenvalues.max())
    if options.eps_inside:
        p = (ratio + options.eps).pow(options.alpha)
    else:
        p = ratio.pow(options.alpha) + options.eps
    return (eigenvectors * p) @ eigenvectors.mT


def _directset_rule(stats: Tensor, options: RuleOptions) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(stats)
    return directset_from_eigh(eigenvalues, eigenvectors, options)


def _directpred_rule(stats: Tensor, options: RuleOptions) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(stats)
    return directset_from_eigh(eigenvalues, eigenvectors,
                               RuleOptions(eps=options.eps, alpha=0.5, eps_inside=options.eps_inside))


def _directcopy_rule(stats: Tensor, options: RuleOptions) -> Tensor:
    top = torch.linalg.eigvalsh(stats).max()
    eye = torch.eye(stats.shape[-1], dtype=stats.dtype, device=stats.device)
    return stats * inverse_or_zero(top) + options.eps * eye  # with alpha = 1, eps inside or out is the same


# ---------------------------------------------------------------------- matrix-product rules
def _check_square(matrix: Tensor, name: str) -> None:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(matrix.shape)}")


def _frobenius_normalized(sigma: Tensor) -> Tuple[Tensor, Tensor]:
    """``(sigma / ||sigma||_F, ||sigma||_F)``: eigenvalues of a PSD ``sigma`` land in [0, 1]."""
    norm = torch.linalg.matrix_norm(sigma).clamp_min(_TINY_NORM)
    return sigma / norm, norm


def _coupled_newton_schulz(a: Tensor, steps: int, need_root: bool = True) -> Tuple[Tensor, Tensor]:
    """``(A_n, B_n)`` of ``A <- A T, B <- T B`` with ``T = (3I - B A) / 2``, ``A_0 = a, B_0 = I``.

    For ``a`` with eigenvalues in (0, 1], ``A_n -> a^(1/2)`` and ``B_n -> a^(-1/2)``.
    The last step skips the factor the caller does not need (one product fewer).
    """
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    root, inv_root = a, eye
    for step in range(steps):
        t = 0.5 * (3.0 * eye - inv_root @ root)
        last = step == steps - 1
        if need_root or not last:
            root = root @ t
        if not need_root or not last:
            inv_root = t @ inv_root
    return root, inv_root


def newton_schulz_sqrt(sigma: Tensor, steps: int = 9) -> Tensor:
    """Square root of a PSD matrix by coupled Newton-Schulz (the ``ns`` predictor).

    ``A_0 = Sigma / ||Sigma||_F``, ``B_0 = I``; each step ``T = (3I - B A) / 2``,
    ``A <- A T``, ``B <- T B``; returns ``A_n * sqrt(||Sigma||_F)``, which tends to
    ``Sigma^(1/2)``. Costs ``3 * steps - 1`` matrix products.

    Per eigenvalue ``lambda`` with ``a = lambda / ||Sigma||_F``, the result is
    ``sqrt(lambda) * s_n`` where ``s_0 = sqrt(a)`` and ``s <- s (3 - s^2) / 2``. After 9
    steps the relative error is 4e-6 at ``a = 0.01`` and 3e-14 at ``a = 0.03``; much
    smaller eigenvalues come out as about ``1.5^n * lambda / sqrt(||Sigma||_F)``.

    Args:
        sigma: Symmetric PSD ``dim x dim`` matrix (float32 or float64).
        steps: Newton-Schulz steps (paper: 9).

    Returns:
        ``dim x dim`` matrix, same dtype and device as ``sigma``.

    Example:
        >>> sigma = torch.diag(torch.tensor([4.0, 1.0]))
        >>> newton_schulz_sqrt(sigma)  # about diag(2, 1)
    """
    _check_square(sigma, "sigma")
    a, norm = _frobenius_normalized(sigma)
    root, _ = _coupled_newton_schulz(a, steps, need_root=True)
    return root * norm.sqrt()


def newton_schulz_fourth_root(sigma: Tensor, steps: int = 7) -> Tensor:
    """Fourth root of a PSD matrix by two chained Newton-Schulz passes (``ns2``).

    ``newton_schulz_sqrt(newton_schulz_sqrt(Sigma, steps), steps)``, which tends to
    ``Sigma^(1/4)``. Costs ``2 * (3 * steps - 1)`` matrix products. Flattens the spectrum
    more than ``ns`` (closer to an orthogonal projection), the paper's best at 100 epochs.

    Args:
        sigma: Symmetric PSD ``dim x dim`` matrix (float32 or float64).
        steps: Newton-Schulz steps per pass (paper: 7).

    Returns:
        ``dim x dim`` matrix, same dtype and device as ``sigma``.

    Example:
        >>> newton_schulz_fourth_root(torch.diag(torch.tensor([16.0, 1.0])))  # about diag(2, 1)
    """
    return newton_schulz_sqrt(newton_schulz_sqrt(sigma, steps), steps)


def stiefel_predictor(sigma: Tensor, steps: int = 9) -> Tensor:
    """Orthonormalised ``Sigma`` by Newton-Schulz on ``Sigma^T Sigma`` (``stiefel``).

    Runs coupled Newton-Schulz on ``Sigma^T Sigma / ||Sigma^T Sigma||_F`` for
    ``B_n ~ (Sigma^T Sigma)^(-1/2)`` (up to a scalar) and returns
    ``B_n Sigma^T / ||B_n||_F``; the scalar cancels. The limit is the transposed polar
    factor of ``Sigma`` divided by ``||(Sigma^T Sigma)^(-1/2)||_F``: for a symmetric
    positive definite ``Sigma``, ``I / ||Sigma^(-1)||_F``, i.e. all well-resolved
    directions get the same gain. Costs ``3 * steps + 1`` matrix products.

    Directions whose squared eigenvalue is tiny relative to ``||Sigma^T Sigma||_F`` get
    a gain that grows with the eigenvalue instead (finite steps), and exact null
    directions get zero.

    Args:
        sigma: Square ``dim x dim`` matrix, normally symmetric PSD (float32 or float64).
        steps: Newton-Schulz steps (paper: 9).

    Returns:
        ``dim x dim`` matrix, same dtype and device as ``sigma``.

    Example:
        >>> stiefel_predictor(torch.diag(torch.tensor([2.0, 1.0])))  # about I / sqrt(1.25)
    """
    _check_square(sigma, "sigma")
    gram, _ = _frobenius_normalized(sigma.mT @ sigma)
    _, inv_root = _coupled_newton_schulz(gram, steps, need_root=False)
    inv_root_norm = torch.linalg.matrix_norm(inv_root).clamp_min(_TINY_NORM)
    return (inv_root @ sigma.mT) / inv_root_norm


def visser_sqrt(sigma: Tensor, steps: int = 9, step_size: float = 0.5) -> Tensor:
    """Square root of a PSD matrix by the Visser iteration (the ``visser`` predictor).

    ``P_0 = I / (2 eta)``, ``P <- P + eta (A - P^2)`` on ``A = Sigma / ||Sigma||_F``,
    returns ``P_n * sqrt(||Sigma||_F)``, which tends to ``Sigma^(1/2)``. Costs ``steps``
    matrix products.

    The normalisation is needed: per eigenvalue ``a`` of ``A`` the error contracts by
    ``|1 - eta (p + sqrt(a))|`` each step, which stays in [0, 1) only while
    ``eta * sqrt(a) < 1``; the head's ``Sigma_hat`` has eigenvalues up to ``dim``.
    Convergence is linear (rate about ``1 - 2 eta sqrt(a)``), slower than Newton-Schulz,
    so small eigenvalues stay well above their root after a few steps. A null direction
    decays only like ``p <- p - eta p^2``, i.e. like ``1 / (eta n)`` (0.150 after the
    default 9 steps, times ``sqrt(||Sigma||_F)``): a floor much like DirectPred's ``eps``.
    ``P_0 = I / (2 eta)`` maximises ``p + eta (a - p^2)``, so ``P_1 = I / (4 eta) + eta A``.

    Args:
        sigma: Symmetric PSD ``dim x dim`` matrix (float32 or float64).
        steps: Iterations. The default 9 is this module's choice, not from the paper.
        step_size: ``eta`` in (0, 1]. The default 0.5 (``P_0 = I``) is this module's
            choice, not from the paper.

    Returns:
        ``dim x dim`` matrix, same dtype and device as ``sigma``.

    Example:
        >>> visser_sqrt(torch.diag(torch.tensor([4.0, 3.0])), steps=40)  # about diag(2, 1.73)
    """
    _check_square(sigma, "sigma")
    if not 0.0 < step_size <= 1.0:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    a, norm = _frobenius_normalized(sigma)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    p = eye / (2.0 * step_size)
    for _ in range(steps):
        p = p + step_size * (a - p @ p)
    return p * norm.sqrt()


def neumann_predictor(z: Tensor, z_target: Tensor) -> Tensor:
    """Least-squares predictor by a first-order Neumann expansion (``ne``).

    With ``C = Z^T Z / n`` and ``X = Z^T Z' / n`` (``n`` rows), the predictor that
    best maps online projections to target projections, ``z' ~ z W``, is
    ``W = C^(-1) X``; the Neumann series ``C^(-1) = sum_k (I - C)^k`` cut after two
    terms gives ``W ~ (2I - C) X = 2 Z^T Z' / n - Z^T Z Z^T Z' / n^2``. The cut error
    is ``(I - C)^2 C^(-1) X``, small only when ``C`` is near the identity (e.g.
    whitened or suitably scaled projections). Costs two ``dim x n x dim`` products
    and one ``dim x dim`` product.

    ``W`` acts on row vectors (``p = z @ W``); as ``head.weight`` of a head that
    computes ``z @ weight.T``, use ``W.T``.

    Args:
        z: ``n x dim`` online projections.
        z_target: ``n x dim`` target projections of the other view (treated as data).

    Returns:
        ``dim x dim`` matrix, same dtype and device as ``z``.

    Example:
        >>> w = neumann_predictor(z0.detach(), t1)
        >>> p0 = z0 @ w
    """
    if z.dim() != 2 or z.shape != z_target.shape:
        raise ValueError(
            f"z and z_target must be n x dim with the same shape, got {tuple(z.shape)} and {tuple(z_target.shape)}"
        )
    n = z.shape[0]
    corr = z.mT @ z / n
    cross = z.mT @ z_target / n
    return 2.0 * cross - corr @ cross


def _matmul_rule(predictor: Callable[[Tensor], Tensor]) -> Callable[[Tensor, RuleOptions], Tensor]:
    """An Edge-of-Orthogonality predictor as a rule: ``P(stats) + eps I`` (``eps = 0``: the pure rule)."""

    def rule(stats: Tensor, options: RuleOptions) -> Tensor:
        weight = predictor(stats)
        if options.eps:
            weight = weight + options.eps * torch.eye(stats.shape[-1], dtype=stats.dtype, device=stats.device)
        return weight

    rule.__name__ = rule.__qualname__ = f"{predictor.__name__}_rule"
    return rule


# ---------------------------------------------------------------------- the name table
#: Head options every name starts from; a member's own ``defaults`` override them.
HEAD_DEFAULTS: Mapping[str, Any] = {"rho": 0.3, "eps": 0.01, "freq": 1, "trainable": False}


@dataclass(frozen=True)
class Variant:
    """One member of the family: its rule, the rule options it reads, the head options its name means."""

    rule: Callable[[Tensor, RuleOptions], Tensor]
    """The exact rule: normalised statistics and options to ``W_p``."""
    summary: str
    spectral_power: Optional[Callable[[RuleOptions], Optional[float]]] = None
    """For rules ``p_j = (s_j / max s)^a + eps``: the power ``a`` under these options (the
    iterative refresh evaluates ``a`` in {1/2, 1}); None for the other rules."""
    takes: Tuple[str, ...] = ()
    """Rule options beyond ``eps`` that this member reads (``alpha``, ``eps_inside``)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Head options the name stands for, over `HEAD_DEFAULTS`."""

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


# Edge of Orthogonality: the statistics of the current step (no EMA) and the pure rule.
_PER_STEP = {"rho": 0.0, "eps": 0.0}
_SQRT = _fixed_power(0.5)

#: The family by name; ``DirectPredHead(variant=...)``, the adapters and the benchmarks look names up here.
VARIANTS: Dict[str, Variant] = {
    "directpred": Variant(_directpred_rule, "U diag(sqrt(s / max s) + eps) U^T", _SQRT, ("eps_inside",)),
    "directpred-hybrid": Variant(
        _directpred_rule, "DirectPred refreshed every 5 steps, trained by the optimizer in between (the paper's hybrid)",
        _SQRT, ("eps_inside",), {"freq": 5, "trainable": True}),
    "directcopy": Variant(_directcopy_rule, "F / lambda_max + eps I", _fixed_power(1.0)),
    "directset": Variant(_directset_rule, "U diag((s / max s)^alpha + eps) U^T", _directset_power,
                         ("alpha", "eps_inside")),
    "ns": Variant(_matmul_rule(newton_schulz_sqrt), "coupled Newton-Schulz, 9 steps: ~ F^(1/2)", defaults=_PER_STEP),
    "ns2": Variant(_matmul_rule(newton_schulz_fourth_root), "two Newton-Schulz passes, 7 steps each: ~ F^(1/4)",
                   defaults=_PER_STEP),
    "stiefel": Variant(_matmul_rule(stiefel_predictor),
                       "Newton-Schulz on F^T F: B F^T / ||B||_F, B ~ (F^T F)^(-1/2)", defaults=_PER_STEP),
    "visser": Variant(_matmul_rule(visser_sqrt), "Visser iteration P <- P + eta (F - P^2), 9 steps: ~ F^(1/2)",
                      defaults=_PER_STEP),
}


def variant_defaults(variant: str) -> Dict[str, Any]:
    """The head options ``variant`` stands for (``rho``, ``eps``, ``freq``, ``trainable``)."""
    return {**HEAD_DEFAULTS, **VARIANTS[variant].defaults}


def member_options(name: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """``options`` for the member an adapter names ``name``, with ``variant=name``.

    The name picks the variant and its defaults: a ``variant`` naming another member would be
    that member with this name's defaults, a head no name stands for, so it is refused.
    """
    if name not in VARIANTS:
        raise ValueError(f"predictor must be one of {list(VARIANTS)}, got {name!r}")
    variant = options.get("variant", name)
    if variant != name:
        raise ValueError(f"predictor {name!r} is variant {name!r}, got variant={variant!r}; "
                         f"name the member instead (one of {list(VARIANTS)})")
    return {**options, "variant": name}


def directpred_weight(corr: Tensor, eps: float) -> Tensor:
    """DirectPred predictor (Tian, Chen & Ganguli, ICML 2021, Eq. 18) for a correlation ``corr``."""
    return VARIANTS["directpred"](corr, eps)


def directcopy_weight(corr: Tensor, eps: float) -> Tensor:
    """DirectCopy predictor (Wang et al., 2021): ``W_p = F / lambda_max(F) + eps * I``."""
    return VARIANTS["directcopy"](corr, eps)
