"""How a :class:`~directpred_plugin.DirectPredHead` evaluates its rule at a refresh.

A strategy is an ``nn.Module`` built as ``Strategy(dim, **options)`` and called as
``strategy(stats, variant, options)`` on the scale-normalised statistics
(:func:`~directpred_plugin.rules.normalise_statistics`). It returns a candidate ``W_p``
and a 0-dim boolean tensor saying whether the candidate may be used; the head keeps the
previous ``W_p`` where it may not. Strategies are looked up by name in
:data:`REFRESH_STRATEGIES`.

- :class:`ExactRefresh`: the variant's own rule (an eigendecomposition for spectral rules).
- :class:`IterativeRefresh`: matrix products only, with a certified error bound.
- :class:`AutoRefresh`: whichever of the two measured faster on the first refresh.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .distributed import all_reduce_sum_
from .rules import RuleOptions, Variant, all_finite, inverse_or_zero, largest_magnitude

__all__ = ["ExactRefresh", "IterativeRefresh", "AutoRefresh", "REFRESH_STRATEGIES"]

Candidate = Tuple[Tensor, Tensor]


class ExactRefresh(nn.Module):
    """The variant's rule evaluated exactly: the reference.

    Runs in the statistics' dtype (float32 or float64, never half precision). If the rule
    raises (e.g. the eigendecomposition does not converge) or yields a non-finite weight it
    is retried in float64; if that fails too the candidate is marked unusable. Checking
    convergence reads the result on the host: on an accelerator this waits for the device
    (so does the eigendecomposition itself); use :class:`IterativeRefresh` to avoid it.
    """

    def __init__(self, dim: Optional[int] = None) -> None:
        super().__init__()

    def forward(self, stats: Tensor, variant: Variant, options: RuleOptions) -> Candidate:
        dtypes = [stats.dtype] if stats.dtype == torch.float64 else [stats.dtype, torch.float64]
        for dtype in dtypes:
            try:
                weight = variant.rule(stats.to(dtype), options)
            except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
                continue
            if bool(all_finite(weight)):
                return weight.to(stats.dtype), torch.ones((), dtype=torch.bool, device=stats.device)
        return torch.zeros_like(stats), torch.zeros((), dtype=torch.bool, device=stats.device)


#: Lower end of the scaled cubic's plateau: keeps ``g(s) >= 0`` for ``s <= sqrt(3) * 0.6``.
_MIN_PEAK = 0.6


@lru_cache(maxsize=None)
def _sqrt_schedule(floor: float, steps: int) -> Tuple[Tuple[float, float], ...]:
    """Coefficients ``(c1, c3)`` of the odd cubics ``g(s) = c1 s - c3 s^3`` of each step.

    In the coupled iteration the eigenvalue ``a`` of ``A`` is carried as ``y = sqrt(a) * s``
    with ``s`` starting at ``sqrt(a)``; each step maps ``s -> g(s)``. Every ``g`` peaks at
    exactly 1, so ``s`` never exceeds 1 (the iterate approaches the square root from
    below, which is what makes the trace certificate valid), and among such cubics it is
    the one that lifts the lower end ``ell`` of the current interval ``[ell, 1]`` the most.
    With ``ell = 1`` it is the classical Newton-Schulz step.
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
    """Matrix products only, accepted only under a certified error bound.

    - ``lambda_max`` is bracketed by repeated squaring: with ``B_k`` the normalised
      ``A^(2^k)``, the product of the normalising factors gives ``||A^(2^k)||_F^(2^-k)``,
      an upper bound ``U`` that tightens to ``lambda_max`` (within ``dim^(2^-(k+1))``);
      the Rayleigh quotient of ``B_k``'s largest column is a lower bound ``theta``. Both are
      bounds whatever the spectrum: no start vector can miss the top eigenvector.
    - DirectCopy: ``W_p = A / theta + eps I``; its error is at most ``(U - theta) / theta``.
    - DirectPred: ``sqrt(A / U)`` by a coupled Newton-Schulz iteration with per-step scaled
      cubics (:func:`_sqrt_schedule`), which approaches the root from below because
      ``A / U`` has no eigenvalue above 1; so ``tr(A/U) - ||Y||_F^2 >= ||sqrt(A/U) - Y||_F^2``
      (the trace certificate). Rescaled by ``sqrt(U / theta)``, plus ``eps I``.

    The bound on ``||W - W_exact||_F / ||W_exact||_F`` is computed on the device; a
    candidate above ``tol`` (or non-finite) is refused and the head keeps its previous
    ``W_p`` and counts it (``refresh_rejections``); the head's next refresh then uses the
    exact rule. Rules other than DirectSet with power 1/2 or 1 (eps outside) are
    evaluated exactly. Nothing is read on the host.

    Args:
        dim: Width of the statistics.
        tol: Accepted bound on the relative Frobenius error.
        squarings: Repeated squarings for the ``lambda_max`` bracket (``2^squarings`` is the
            power the top of the spectrum is isolated with).
        sqrt_steps: Newton-Schulz steps for DirectPred's square root.
        sqrt_floor: The square-root iteration is tuned to lift ``sqrt(a / U)`` from this value.
    """

    def __init__(
        self,
        dim: int,
        *,
        tol: float = 1e-2,
        squarings: int = 10,
        sqrt_steps: int = 12,
        sqrt_floor: float = 1e-3,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
        for name, value in (("squarings", squarings), ("sqrt_steps", sqrt_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(sqrt_floor, (int, float)) and 0 < sqrt_floor < 1):
            raise ValueError(f"sqrt_floor must be a float in (0, 1), got {sqrt_floor!r}")
        self.dim = dim
        self.tol = float(tol)
        self.squarings = squarings
        self.sqrt_steps = sqrt_steps
        self.sqrt_floor = float(sqrt_floor)
        self.exact = ExactRefresh(dim)

    def forward(self, stats: Tensor, variant: Variant, options: RuleOptions) -> Candidate:
        power = variant.power(options)
        if power not in (0.5, 1.0):
            return self.exact(stats, variant, options)
        weight, bound = self.candidate(stats, power, options.eps)
        return weight, all_finite(weight) & (bound <= self.tol)

    def candidate(self, stats: Tensor, power: float, eps: float) -> Tuple[Tensor, Tensor]:
        """``(W, bound)``: the weight for ``p = (s / max s)^power + eps`` and its error bound."""
        lower, upper = self.top_eigenvalue_bracket(stats)
        gap = (upper - lower) * inverse_or_zero(lower)
        eye = torch.eye(stats.shape[-1], dtype=stats.dtype, device=stats.device)
        if power == 1.0:
            return stats * inverse_or_zero(lower) + eps * eye, gap
        scaled = stats * inverse_or_zero(upper)
        root, certificate = self.square_root(scaled)
        rescale = torch.sqrt(upper * inverse_or_zero(lower))
        weight = root * rescale + eps * eye
        # ||W_exact||_F^2 >= tr(A / lambda_max) + eps^2 d >= tr(scaled) + eps^2 d, and the
        # lambda_max estimate adds at most gap / 2 of ||sqrt(A / lower)||_F.
        trace = scaled.diagonal().sum().clamp_min(0)
        error = rescale * certificate.abs().sqrt() + gap / 2 * rescale * trace.sqrt()
        norm = torch.sqrt(trace + eps * eps * stats.shape[-1])
        return weight, error / norm.clamp_min(torch.finfo(stats.dtype).tiny)

    def top_eigenvalue_bracket(self, stats: Tensor) -> Tuple[Tensor, Tensor]:
        """Certified ``(lower, upper)`` bounds on the largest eigenvalue of a PSD ``stats``."""
        tiny = torch.finfo(stats.dtype).tiny
        norm = stats.norm()
        power = stats * inverse_or_zero(norm)
        log_upper = torch.log(norm.clamp_min(tiny))
        for k in range(1, self.squarings + 1):
            power = power @ power
            factor = power.norm()
            power = power * inverse_or_zero(factor)
            log_upper = log_upper + torch.log(factor.clamp_min(tiny)) / 2**k
        upper = torch.where(norm > 0, torch.exp(log_upper), torch.zeros_like(norm))
        # the largest column of a high power of a PSD matrix lies close to its top eigenspace
        column = power.index_select(1, power.norm(dim=0).argmax().reshape(1)).squeeze(1)
        column = column * inverse_or_zero(column.norm())
        lower = (column @ (stats @ column)).clamp_min(0)
        return lower, torch.maximum(upper, lower)

    def square_root(self, a: Tensor) -> Tuple[Tensor, Tensor]:
        """Coupled Newton-Schulz ``sqrt(a)`` for PSD ``a`` with eigenvalues <= 1, and ``tr(a) - ||Y||_F^2``."""
        trace = a.diagonal().sum()
        # Y_k -> sqrt(a), Z_k -> a^(-1/2) on the converged part; Z_0 = I, so Z_1 = P_0.
        y: Tensor = a
        z: Optional[Tensor] = None
        p: Optional[Tensor] = None
        for c1, c3 in _sqrt_schedule(self.sqrt_floor, self.sqrt_steps):
            if p is not None:
                z = p if z is None else p @ z
            t = y if z is None else z @ y
            p = t * (-c3)
            p.diagonal().add_(c1)
            y = y @ p
            y = (y + y.mT) / 2  # products of commuting factors, symmetric up to rounding
        return y, trace - y.square().sum()


class AutoRefresh(nn.Module):
    """The faster of :class:`ExactRefresh` and :class:`IterativeRefresh`, by measurement.

    On the first refresh that the iterative strategy can serve, both strategies run on the
    real statistics, once to warm up and three times timed (waiting for the device around
    each; the fastest run counts). The iterative strategy is chosen only if it took less
    than ``margin`` times the exact one. The measurement is made once per process for each
    device type, width, dtype and power, so all heads of a process agree; under
    ``torch.distributed`` the timings are summed over ranks first, so that every rank makes
    the same choice (and so keeps the same ``W_p``). The choice is a buffer: it is saved
    with the head and a resumed run keeps it. A choice by timing can differ between
    machines; pass ``refresh="exact"`` where runs must be bit-reproducible across them.
    Options go to the iterative strategy.
    """

    choice: Tensor
    UNDECIDED, EXACT, ITERATIVE = -1, 0, 1

    def __init__(self, dim: int, *, margin: float = 0.8, process_group: Optional[object] = None, **options) -> None:
        super().__init__()
        if not (isinstance(margin, (int, float)) and margin > 0):
            raise ValueError(f"margin must be a positive float, got {margin!r}")
        self.margin = float(margin)
        self.process_group = process_group
        self.iterative = IterativeRefresh(dim, **options)
        self.exact = self.iterative.exact
        self.register_buffer("choice", torch.full((), self.UNDECIDED, dtype=torch.long))
        self._choice: Optional[int] = None
        self.timings: Dict[str, float] = {}

    def forward(self, stats: Tensor, variant: Variant, options: RuleOptions) -> Candidate:
        power = variant.power(options)
        if power not in (0.5, 1.0):
            return self.exact(stats, variant, options)
        if self._choice is None:
            self._choice = int(self.choice)
        if self._choice == self.UNDECIDED:
            # Timing waits for the device anyway, so reading it here costs nothing more. All-zero
            # statistics (no update folded yet: the first pools were skipped or empty) are no
            # refresh to measure, and deciding on them would make a skipped step change state.
            if not bool(largest_magnitude(stats) > 0):
                return self.exact(stats, variant, options)
            self._choice = self._measure(stats, variant, options)
            self.choice.fill_(self._choice)
        strategy = self.iterative if self._choice == self.ITERATIVE else self.exact
        return strategy(stats, variant, options)

    def _measure(self, stats: Tensor, variant: Variant, options: RuleOptions) -> int:
        power = variant.power(options)
        key = (stats.device.type, stats.shape[-1], stats.dtype, power)
        if key in _MEASURED:  # one measurement per process and kind of refresh: heads agree
            self.timings = _MEASURED[key]
        else:
            seconds = []
            for strategy in (self.exact, self.iterative):
                strategy(stats, variant, options)  # warm-up
                runs = []
                for _ in range(3):  # the fastest of three: a busy machine only slows runs down
                    _wait_for(stats.device)
                    start = time.perf_counter()
                    strategy(stats, variant, options)
                    _wait_for(stats.device)
                    runs.append(time.perf_counter() - start)
                seconds.append(min(runs))
            measured = torch.tensor(seconds, dtype=torch.float64, device=stats.device)
            all_reduce_sum_(measured, self.process_group)
            exact, iterative = measured.tolist()
            self.timings = _MEASURED[key] = {"exact_s": exact, "iterative_s": iterative}
        return self.ITERATIVE if self.timings["iterative_s"] < self.margin * self.timings["exact_s"] else self.EXACT

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._choice = None  # re-read from the loaded buffer


#: Timings of AutoRefresh's measurements in this process, by (device type, dim, dtype, power).
_MEASURED: Dict[tuple, Dict[str, float]] = {}


def _wait_for(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


#: Refresh strategies by name; ``DirectPredHead(refresh=...)`` looks them up here.
REFRESH_STRATEGIES: Dict[str, Type[nn.Module]] = {
    "exact": ExactRefresh,
    "iterative": IterativeRefresh,
    "auto": AutoRefresh,
}
