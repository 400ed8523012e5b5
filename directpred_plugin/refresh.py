"""How a :class:`~directpred_plugin.DirectPredHead` turns its correlation estimate into ``W_p``.

A refresh strategy is an ``nn.Module`` built as ``Strategy(dim, **options)`` (so any state
it keeps, e.g. a warm start, is saved with the head) and called as
``strategy(corr, variant, eps)``. It returns the new weight, or ``None`` when it could not
compute a finite one, in which case the head keeps the previous weight. Strategies are
looked up by name in :data:`REFRESH_STRATEGIES`.

A strategy may also offer ``propose(corr, variant, eps)``: a candidate weight and a
0-dim boolean tensor saying whether the candidate passed the strategy's own accuracy
check, computed without reading any tensor on the host. The head uses it on CUDA so that
a refresh never waits for the GPU; it returns ``None`` when the strategy has no such path.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .functional import VARIANTS, _inverse_top


class Proposal(NamedTuple):
    """A candidate ``W_p`` and a 0-dim bool tensor: did it pass the strategy's own check?"""

    weight: Tensor
    ok: Tensor


class ExactRefresh(nn.Module):
    """Full eigendecomposition of the correlation at every refresh: the reference rule.

    Runs in the correlation's own dtype (float32 or float64, never half precision). If the
    decomposition raises or yields a non-finite weight it is retried in float64; if that
    fails too, ``None`` is returned and the head keeps its previous weight.
    """

    def __init__(self, dim: Optional[int] = None) -> None:
        super().__init__()

    def forward(self, corr: Tensor, variant: str, eps: float) -> Optional[Tensor]:
        weight_fn = VARIANTS[variant]
        dtypes = [corr.dtype] if corr.dtype == torch.float64 else [corr.dtype, torch.float64]
        for dtype in dtypes:
            try:
                weight = weight_fn(corr.to(dtype), eps)
            except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
                continue
            if bool(torch.isfinite(weight).all()):
                return weight
        return None

    def propose(self, corr: Tensor, variant: str, eps: float) -> Optional[Proposal]:
        return None  # an eigendecomposition checks its convergence on the host


#: Lower end of the scaled cubic's plateau: keeps ``g(s) >= 0`` for ``s <= sqrt(3) * 0.6``,
#: i.e. eigenvalues up to 1.08 times the estimated maximum.
_MIN_PEAK = 0.6


@lru_cache(maxsize=None)
def _sqrt_schedule(floor: float, steps: int) -> Tuple[Tuple[float, float], ...]:
    """Coefficients ``(c1, c3)`` of the odd cubics ``g(s) = c1 s - c3 s^3`` of each step.

    In the coupled iteration the eigenvalue ``a`` of ``A`` is carried as ``y = sqrt(a) * s``
    with ``s`` starting at ``sqrt(a)``; each step maps ``s -> g(s)``. Every ``g`` peaks at
    exactly 1, so ``s`` never exceeds 1 (``y <= sqrt(a)``: the iteration approaches the
    square root from below, which is what makes the trace certificate valid), and among
    such cubics it is the one that lifts the lower end ``ell`` of the current interval
    ``[ell, 1]`` the most. With ``ell = 1`` it is the classical Newton-Schulz step.
    """
    schedule: List[Tuple[float, float]] = []
    ell = floor
    for _ in range(steps):
        lo, hi = 1 / math.sqrt(3), 1.0  # position of the peak
        for _ in range(60):  # bisection: lowest peak whose g(1) still reaches g(ell)
            mid = (lo + hi) / 2
            c1, c3 = 1.5 / mid, 0.5 / mid**3
            if c1 * ell - c3 * ell**3 < c1 - c3:
                hi = mid
            else:
                lo = mid
        peak = max(hi, _MIN_PEAK)
        c1, c3 = 1.5 / peak, 0.5 / peak**3
        schedule.append((c1, c3))
        ell = min(c1 * ell - c3 * ell**3, c1 - c3)
    return tuple(schedule)


class IterativeRefresh(nn.Module):
    """Matrix-multiply-only refresh with a self-check, falling back to :class:`ExactRefresh`.

    - ``lambda_max`` comes from a few Lanczos steps (Rayleigh-Ritz on a Krylov space with
      full reorthogonalisation) started from the previous top eigenvector, which is kept
      as state. DirectCopy needs nothing else: ``W_p = F / lambda_max + eps I``.
    - DirectPred's ``sqrt(F / lambda_max)`` comes from a coupled Newton-Schulz iteration
      with per-step scaled cubics (see :func:`_sqrt_schedule`). Each step is three matrix
      products; there is no eigendecomposition and no inverse.

    Self-check: the iterate approaches the square root from below, so
    ``||sqrt(A) - Y||_F^2 <= tr(A) - ||Y||_F^2`` (a trace certificate that costs one
    reduction), and the Ritz residual ``||F x - theta x||`` bounds the error of
    ``lambda_max``. Together they bound the relative Frobenius error of ``W_p`` against
    the exact rule for the same ``F``; when the bound exceeds ``tol`` the result is
    replaced by the exact one (``fallbacks`` counts how often).

    Args:
        dim: Width of the correlation matrix.
        tol: Accepted bound on ``||W - W_exact||_F / ||W_exact||_F``.
        lanczos_steps: Krylov dimension for ``lambda_max``.
        sqrt_steps: Newton-Schulz steps: the cap on the host-checked path (which stops as
            soon as the certificate passes) and the fixed count on the sync-free path.
        sqrt_floor: The iteration is tuned to lift ``sqrt(a / lambda_max)`` from this
            value to 1 first; smaller values handle smaller eigenvalues in fewer steps.
    """

    warm: Tensor
    probe: Tensor
    fallbacks: Tensor

    def __init__(
        self,
        dim: int,
        *,
        tol: float = 1e-2,
        lanczos_steps: int = 32,
        sqrt_steps: int = 12,
        sqrt_floor: float = 1e-3,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
        for name, value in (("lanczos_steps", lanczos_steps), ("sqrt_steps", sqrt_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(sqrt_floor, (int, float)) and 0 < sqrt_floor < 1):
            raise ValueError(f"sqrt_floor must be a float in (0, 1), got {sqrt_floor!r}")
        self.dim = dim
        self.tol = float(tol)
        self.lanczos_steps = lanczos_steps
        self.sqrt_steps = sqrt_steps
        self.sqrt_floor = float(sqrt_floor)
        self.exact = ExactRefresh(dim)
        # A fixed pseudo-random direction mixed into every start vector, so that the
        # Krylov space cannot miss a new top eigenvector orthogonal to the previous one.
        probe = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.register_buffer("probe", probe / probe.norm(), persistent=False)
        self.register_buffer("warm", self.probe.clone())
        self.register_buffer("fallbacks", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ public
    def forward(self, corr: Tensor, variant: str, eps: float) -> Optional[Tensor]:
        """Host-checked refresh: the iterative weight if it passes, else the exact one."""
        weight, ok = self._compute(corr, variant, eps, host_checks=True)
        if bool(ok):
            return weight
        self.fallbacks.add_(1)
        return self.exact(corr, variant, eps)

    def propose(self, corr: Tensor, variant: str, eps: float) -> Optional[Proposal]:
        """Sync-free refresh: fixed iteration counts, the check left on the device."""
        weight, ok = self._compute(corr, variant, eps, host_checks=False)
        return Proposal(weight, ok)

    # ---------------------------------------------------------------- internals
    def _compute(self, corr: Tensor, variant: str, eps: float, host_checks: bool) -> Tuple[Tensor, Tensor]:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        theta, residual = self._top_eigenvalue(corr, host_checks)
        d = corr.shape[-1]
        tiny = torch.finfo(corr.dtype).tiny
        rel_residual = residual / theta.clamp_min(tiny)
        if variant == "directcopy":
            weight = corr * _inverse_top(theta)
            weight.diagonal().add_(eps)
            # |1/theta - 1/lambda| ||F|| <= (residual / theta) ||F / lambda||
            bound = rel_residual
            return weight, torch.isfinite(weight).all() & (bound <= self.tol)

        # DirectPred: sqrt(F / lambda_max) + eps I.
        upper = theta + residual  # >= lambda_max when theta is the top Ritz value
        scaled = corr * _inverse_top(upper)
        root, certificate = self._sqrt(scaled, eps, host_checks)
        # back from F / upper to F / theta, the estimate of lambda_max
        rescale = torch.sqrt(upper * _inverse_top(theta)).where(theta > 0, torch.ones_like(theta))
        weight = root * rescale
        weight.diagonal().add_(eps)
        bound = self._relative_bound(scaled, certificate, rescale, rel_residual, eps, d)
        return weight, torch.isfinite(weight).all() & (bound <= self.tol)

    @staticmethod
    def _relative_bound(scaled: Tensor, certificate: Tensor, rescale: Tensor,
                        rel_residual: Tensor, eps: float, d: int) -> Tensor:
        """Bound on ``||W - W_exact||_F / ||W_exact||_F`` for the DirectPred weight.

        ``certificate`` is ``tr(A) - ||Y||_F^2`` with ``A = F / upper``; rounding can make
        it slightly negative, so its magnitude is used. The ``lambda_max`` estimate adds at
        most ``rel_residual / 2`` of ``||sqrt(F / theta)||_F``. ``||W_exact||_F^2`` is at
        least ``tr(F / lambda_max) + eps^2 d >= tr(A) + eps^2 d``.
        """
        trace = scaled.diagonal().sum().clamp_min(0)
        sqrt_part = rescale * (trace.sqrt())
        error = rescale * certificate.abs().sqrt() + rel_residual / 2 * sqrt_part
        norm = torch.sqrt(trace + eps * eps * d)
        return error / norm.clamp_min(torch.finfo(scaled.dtype).tiny)

    def _top_eigenvalue(self, corr: Tensor, host_checks: bool) -> Tuple[Tensor, Tensor]:
        """Top Ritz value of a block Krylov space and its residual norm; updates the warm start.

        The block starts from the previous top eigenvector and a fixed random direction:
        when the order at the top of a near-degenerate spectrum changes between refreshes,
        the previous top vector is close to an eigenvector of a lower eigenvalue, and its
        small residual alone would accept that eigenvalue. The random direction keeps a
        component along the new top eigenvector for the Krylov space to amplify.
        """
        d = corr.shape[-1]
        tiny = torch.finfo(corr.dtype).tiny
        # rounding noise: a direction this much smaller than its image is not orthogonal
        # to the basis any more; a zero row instead only adds a zero Ritz value
        noise = math.sqrt(torch.finfo(corr.dtype).eps)
        rows = min(2 * self.lanczos_steps, 2 * math.ceil(d / 2))
        basis = corr.new_zeros(rows, d)
        images = corr.new_zeros(rows, d)
        block = torch.stack([self.warm.to(corr.dtype), self.probe.to(corr.dtype)])
        scale = block.norm(dim=1)
        for j in range(0, rows, 2):
            used = basis[:j]
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                block = block - (block @ used.mT) @ used
            for i in range(2):  # Gram-Schmidt inside the block, with the same guard
                v = block[i] - (block[i] @ basis[j : j + i].mT) @ basis[j : j + i]
                norm = v.norm()
                keep = norm > noise * scale[i]
                basis[j + i] = torch.where(keep, v / norm.clamp_min(tiny), torch.zeros_like(v))
            current = basis[j : j + 2]
            block = current @ corr
            images[j : j + 2] = block
            scale = block.norm(dim=1)
        basis, images = basis[: min(rows, d)], images[: min(rows, d)]
        projected = basis @ images.mT
        projected = (projected + projected.mT) / 2
        y = self._top_vector(projected, host_checks)
        x = basis.mT @ y
        x = x / x.norm().clamp_min(tiny)
        fx = corr @ x
        theta = x @ fx
        residual = (fx - theta * x).norm()
        self.warm.copy_(torch.where(torch.isfinite(x).all(), x.to(self.warm.dtype), self.warm))
        return theta.clamp_min(0), residual

    @staticmethod
    def _top_vector(matrix: Tensor, host_checks: bool) -> Tensor:
        """Top eigenvector of a small PSD matrix."""
        if host_checks:
            return torch.linalg.eigh(matrix.double())[1][:, -1].to(matrix.dtype)
        # Sync-free: normalised repeated squaring concentrates M^(2^k) on the top
        # eigenvectors; a Rayleigh quotient of its leading column is then within a
        # fraction of a percent of the top eigenvalue, and the residual check follows.
        power = matrix / matrix.norm().clamp_min(torch.finfo(matrix.dtype).tiny)
        for _ in range(12):
            power = power @ power
            power = power / power.norm().clamp_min(torch.finfo(matrix.dtype).tiny)
        column = power.diagonal().argmax()
        return power.index_select(1, column.reshape(1)).squeeze(1)

    def _sqrt(self, a: Tensor, eps: float, host_checks: bool) -> Tuple[Tensor, Tensor]:
        """Coupled Newton-Schulz for ``sqrt(a)`` and its trace certificate ``tr(a) - ||Y||^2``."""
        floor = eps * eps * a.shape[-1]
        trace = a.diagonal().sum()
        # Y_k -> sqrt(a), Z_k -> a^(-1/2) on the converged part; Z_k = P_{k-1} Z_{k-1} is
        # formed lazily so that stopping early skips it. Z_0 = I, so Z_1 = P_0.
        y, z, p = a, None, None
        certificate = trace
        for c1, c3 in _sqrt_schedule(self.sqrt_floor, self.sqrt_steps):
            if p is not None:
                z = p if z is None else p @ z
            t = y if z is None else z @ y
            p = t * (-c3)
            p.diagonal().add_(c1)
            y = y @ p
            y = (y + y.mT) / 2  # products of commuting factors, symmetric up to rounding
            certificate = trace - y.square().sum()
            if host_checks:
                # stop once the iteration's share of the error budget is met
                if float(certificate.abs()) <= (0.5 * self.tol) ** 2 * (max(float(trace), 0.0) + floor):
                    break
        return y, certificate


class AutoRefresh(nn.Module):
    """The measured-faster accurate strategy for the variant, width and device.

    On accelerators :class:`IterativeRefresh` (matrix products are cheap there and an
    eigendecomposition would stall the host). On CPU, DirectPred uses
    :class:`ExactRefresh`: LAPACK's eigendecomposition costs about six matrix products
    at ``dim = 2048`` while the square-root iteration needs about thirty; DirectCopy uses
    :class:`IterativeRefresh` from ``dim >= 1024`` (one block-Lanczos run instead of all
    eigenvalues: half the per-call cost at 1024 in ``directpred-bench speed``); at 512
    the two cost the same and below that the eigenvalue routine is cheaper than the
    Lanczos loop's Python overhead. Options are passed to the iterative strategy.
    """

    #: Narrowest DirectCopy head for which the Lanczos refresh beats ``eigvalsh`` on CPU.
    cpu_iterative_min_dim = 1024

    def __init__(self, dim: int, **options) -> None:
        super().__init__()
        self.dim = dim
        self.iterative = IterativeRefresh(dim, **options)
        self.exact = self.iterative.exact

    def choose(self, corr: Tensor, variant: str) -> nn.Module:
        if corr.device.type != "cpu":
            return self.iterative
        if variant == "directcopy" and self.dim >= self.cpu_iterative_min_dim:
            return self.iterative
        return self.exact

    def forward(self, corr: Tensor, variant: str, eps: float) -> Optional[Tensor]:
        return self.choose(corr, variant)(corr, variant, eps)

    def propose(self, corr: Tensor, variant: str, eps: float) -> Optional[Proposal]:
        return self.choose(corr, variant).propose(corr, variant, eps)


#: Refresh strategies by name; ``DirectPredHead(refresh=...)`` looks them up here.
REFRESH_STRATEGIES: Dict[str, Type[nn.Module]] = {
    "exact": ExactRefresh,
    "iterative": IterativeRefresh,
    "auto": AutoRefresh,
}
