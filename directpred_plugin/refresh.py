"""How a head turns its statistics into ``W_p`` at a refresh: candidates and their use.

A candidate function maps the scale-normalised statistics
(`normalise_statistics`), a variant and its rule options
to ``(W_p, usable)``, ``usable`` a 0-dim boolean tensor; ``DirectPredHead(refresh=...)``
picks one by name:

- ``"exact"``: `exact_candidate`, the variant's own rule (an eigendecomposition for
  spectral rules);
- ``"iterative"``: `iterative_candidate`, matrix products only, under a certified error
  bound (options: `ITERATIVE_DEFAULTS`);
- ``"auto"``: exact on the CPU, iterative on accelerators (`uses_iterative`).

`refresh_weight_` applies a candidate to ``W_p`` in place, decided on the device.
After a refused iterative candidate the head's next refresh computes the thorough one
(`thorough_options`), and after a refused thorough one the exact rule.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .functional import all_finite, inverse_or_zero, normalise_statistics
from .variants import RuleOptions, Variant

__all__ = ["REFRESH_NAMES", "ITERATIVE_DEFAULTS", "exact_candidate", "iterative_candidate", "uses_iterative",
           "thorough_options", "refresh_weight_", "highest_matmul_precision"]

Candidate = Tuple[Tensor, Tensor]

#: ``refresh=`` choices: exact on the CPU and iterative on accelerators, or either everywhere.
REFRESH_NAMES = ("auto", "exact", "iterative")
#: Spectral powers the iterative refresh evaluates with matrix products (sqrt and identity).
ITERATIVE_POWERS = (0.5, 1.0)
#: ``refresh_options`` of the iterative refresh and their defaults: the accepted bound on the
#: relative Frobenius error, the repeated squarings of the ``lambda_max`` bracket (``2^squarings``
#: isolates the top of the spectrum), the Newton-Schulz steps of DirectPred's square root and the
#: value ``sqrt(a / U)`` that iteration is tuned to lift from.
ITERATIVE_DEFAULTS: Mapping[str, float] = {"tol": 1e-2, "squarings": 10, "sqrt_steps": 12, "sqrt_floor": 1e-3}

#: Repeated squarings the thorough form adds (each one halves the log of the bracket's slack).
THOROUGH_EXTRA_SQUARINGS = 4


def _matmul_backends() -> List[Any]:
    """The backends with a per-backend float32 matmul precision (PyTorch 2.9 and later)."""
    backends = [torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)]
    return [b for b in backends if b is not None and hasattr(b, "fp32_precision")]


@contextmanager
def highest_matmul_precision() -> Iterator[None]:
    """Float32 matrix products in IEEE precision inside the block, the user's setting restored after.

    TF32 (``torch.set_float32_matmul_precision("high")``, ``allow_tf32``) or bf16
    (``"medium"``, oneDNN on the CPU) products keep ~10 (8) mantissa bits: the iterative
    refresh's certificate, which needs ~float32 accuracy, then refuses nearly every
    candidate. Both the global setting and the per-backend ``fp32_precision`` are saved,
    whichever API the user set them with, and put back even if the block raises.
    """
    backends = _matmul_backends()
    saved = [backend.fp32_precision for backend in backends]
    try:
        previous: Optional[str] = torch.get_float32_matmul_precision()
    except RuntimeError:  # per-backend settings that disagree with the global one: restore those
        previous = None
    if previous == "highest" and all(p in ("none", "ieee") for p in saved):
        yield  # already IEEE: nothing to change
        return
    torch.set_float32_matmul_precision("highest")  # both APIs, consistently
    try:
        yield
    finally:
        if previous is not None:
            torch.set_float32_matmul_precision(previous)
        for backend, precision in zip(backends, saved):
            backend.fp32_precision = precision


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """Every product of the iterative refresh (one seam: the tests emulate reduced-precision products here)."""
    return a @ b


def exact_candidate(stats: Tensor, variant: Variant, options: RuleOptions) -> Candidate:
    """The variant's rule evaluated exactly: the reference.

    Runs in the statistics' dtype (float32 or float64, never half precision). If the rule
    raises (e.g. the eigendecomposition does not converge) or yields a non-finite weight it
    is retried in float64; if that fails too the candidate is marked unusable. Checking
    convergence reads the result on the host: on an accelerator this waits for the device
    (so does the eigendecomposition itself); the iterative candidate avoids it.
    """
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


@lru_cache(maxsize=None)
def _converged_steps(floor: float) -> int:
    """Steps after which `_sqrt_schedule`'s interval ``[ell, 1]`` is 1 to float64 rounding.

    Fewer steps leave the iterate short of the root; more are classical Newton-Schulz steps on
    an iterate that has converged, where the coupled iteration amplifies rounding on
    ill-conditioned (rank-deficient) statistics and the certificate grows again.
    """
    ell, unit = floor, torch.finfo(torch.float64).eps
    for steps, (c1, c3) in enumerate(_sqrt_schedule(floor, 200), start=1):
        ell = min(c1 * ell - c3 * ell**3, c1 - c3)
        if 1 - ell <= unit:
            return steps
    return 200


#: The square root is taken of ``A / U + shift I`` with ``shift`` this many units of rounding of
#: the compute dtype: float32 statistics of a rank-deficient EMA have eigenvalues down to about
#: ``-1e-7`` of the top, where an unshifted iteration diverges (see `_negative_part_bound`).
SHIFT_UNITS = 2.0
#: Grid (log10 of the eigenvalue, points per decade) over which the scalar iteration is tabulated.
_GRID_DECADES, _GRID_DENSITY = 30, 40


def _scalar_iteration(a: Tensor, schedule: Tuple[Tuple[float, float], ...]) -> Tuple[Tensor, Tensor, Tensor]:
    """The coupled iteration of `_square_root` on each entry of ``a``.

    Returns ``(y, z, p)``: ``y`` and ``z`` as the matrix iteration leaves them on an eigenvalue
    ``a`` (``z`` without the last step's factor) and that last factor ``p``.
    """
    y, z, p = a, torch.ones_like(a), torch.ones_like(a)
    for step, (c1, c3) in enumerate(schedule):
        if step:
            z = p * z
        p = c1 - c3 * (z * y)
        y = y * p
    return y, z, p


def _grid(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.logspace(-_GRID_DECADES, 0, _GRID_DECADES * _GRID_DENSITY + 1, dtype=dtype, device=device)


def _negative_part_bound(residual: Tensor, schedule: Tuple[Tuple[float, float], ...]) -> Tensor:
    """``psi`` with ``sum over a < 0 of (|a| + f(a)^2) <= psi tr(I - Y Z)``, given ``residual >= lambda_max(Y^2 - A)``.

    On an eigenvalue ``a < 0`` the iterate is ``f(a) = a * prod(p) < 0`` and every factor
    ``p = c1 + c3 |t|`` exceeds 1 and grows with ``|t|``, so ``f`` diverges: ``phi(m) = m + f(-m)^2``,
    the eigenvalue of ``E = Y^2 - A`` there, increases steeply with ``m`` (``5e-9`` at ``m = 3e-9``,
    ``4e-6`` at ``1e-7``, ``0.2`` at ``3e-7`` for the default schedule). So ``phi(|a|) <= residual``
    confines every negative eigenvalue to ``[-m*, 0)`` with ``m*`` the first grid point past the
    last one where ``phi < residual``. There ``|a| + f^2 = |a| k_full`` with
    ``k_full = 1 - a z_full^2 <= k * p_last(-m*)`` and ``k = 1 - y z >= 1`` the eigenvalue of
    ``I - Y Z`` (``z`` without the last factor), which is ``>= 0`` on every ``a >= 0`` (there
    ``y z = s_K s_(K-1)`` with both ``s`` in ``[0, 1]``). Everything is computed on the device.
    """
    m = _grid(residual.dtype, residual.device)
    f, _, p_last = _scalar_iteration(-m, schedule)
    phi = torch.nan_to_num(m + f * f, nan=math.inf)  # an overflow of f: the eigenvalue is certainly ruled out
    psi = m * torch.nan_to_num(p_last, nan=math.inf)
    below = torch.where(phi < residual, torch.arange(len(m), device=m.device), -1).max()
    psi = torch.cat([psi, psi.new_full((1,), math.inf)])
    return psi.index_select(0, (below + 1).reshape(1)).squeeze(0) + residual * 0  # a NaN residual stays NaN


@lru_cache(maxsize=None)
def _shift_constant(shift: float, schedule: Tuple[Tuple[float, float], ...]) -> float:
    """``C`` such that the shift costs at most ``C shift^2 z(a)^2`` on every eigenvalue ``a >= 0``.

    Iterating on ``a = b + shift`` for the rule's ``sqrt(max(b, 0))`` costs at most
    ``x(a) = (sqrt(a) - sqrt(max(a - shift, 0)))^2`` more than the trace certificate counts
    (``a`` where ``a <= shift``). ``z ~ 1 / sqrt(a)`` once the iteration has converged and
    ``z ~ prod(c1)`` below the floor, so ``x / (shift z)^2`` is bounded; ``C`` is its largest
    value on a grid of ``a`` 40 points a decade, the shift itself included, with 5% to spare
    (the ratio is smooth between grid points). A constant of the schedule, computed once on
    the host.
    """
    # Python floats, not tensors: a constant of the schedule, so no tensor is read back on any device.
    points = _GRID_DECADES * _GRID_DENSITY
    worst = 0.0
    for a in [10.0 ** (_GRID_DECADES * (k / points - 1)) for k in range(points + 1)] + [shift]:
        y, z, p = a, 1.0, 1.0
        for step, (c1, c3) in enumerate(schedule):
            if step:
                z = p * z
            p = c1 - c3 * (z * y)
            y = y * p
        cost = a if a <= shift else shift * shift / (math.sqrt(a) + math.sqrt(a - shift)) ** 2
        worst = max(worst, cost / (shift * z) ** 2)
    return worst * 1.05


def iterative_candidate(stats: Tensor, variant: Variant, options: RuleOptions, *, tol: float = 1e-2,
                        squarings: int = 10, sqrt_steps: int = 12, sqrt_floor: float = 1e-3,
                        compute_dtype: Optional[torch.dtype] = None) -> Candidate:
    """Matrix products only, accepted only under a certified error bound.

    - ``lambda_max`` is bracketed by repeated squaring: with ``B_k`` the normalised
      ``A^(2^k)``, the product of the normalising factors gives ``||A^(2^k)||_F^(2^-k)``,
      an upper bound ``U`` that tightens to ``lambda_max`` (within ``dim^(2^-(k+1))``);
      the Rayleigh quotient of ``B_k``'s largest column is a lower bound ``theta``. Both are
      bounds whatever the spectrum: no start vector can miss the top eigenvector.
    - DirectCopy: ``W_p = A / theta + eps I``; its error is at most ``(U - theta) / theta``
      (more where ``tr A < 0``, see `iterative_weight`).
    - DirectPred: ``sqrt(A / U + shift I)`` by a coupled Newton-Schulz iteration with per-step
      scaled cubics (`_sqrt_schedule`), which approaches the root from below on every
      eigenvalue in ``[0, 1]``; so there ``a - y^2 >= (sqrt(a) - y)^2`` and the trace
      ``tr(A/U) - ||Y||_F^2`` certifies the error (the trace certificate). Statistics are only
      symmetric, not PSD: float32 rounding leaves eigenvalues down to ~-1e-7 of the top, where
      the iteration diverges and the trace certificate undercounts. The shift of a few
      rounding units keeps those out of the diverging range, its cost is bounded, and the
      residual ``||Y^2 - A'||_F`` certifies that no eigenvalue lies deep enough below 0 to
      matter (`_square_root_error`). Rescaled by ``sqrt(U / theta)``, plus ``eps I``.

    The bound on ``||W - W_exact||_F / ||W_exact||_F`` is computed on the device; a
    candidate above ``tol`` (or non-finite) is refused and the head keeps its previous
    ``W_p`` and counts it (``refresh_rejections``); the refresh after the host learns of it
    computes the thorough candidate (`thorough_options`), and only if that is refused too the exact
    rule. Rules other than DirectSet with power 1/2 or 1 (eps outside)
    are evaluated exactly. Nothing is read on the host. The products run in IEEE float32
    (or float64) whatever the user's TF32 setting (`highest_matmul_precision`).

    Options (`ITERATIVE_DEFAULTS`): ``tol`` the accepted bound, ``squarings`` the
    bracket's repeated squarings, ``sqrt_steps`` and ``sqrt_floor`` the square root's
    schedule; ``compute_dtype`` float64 for the thorough form (None: the statistics' dtype).
    """
    power = variant.power(options)
    if power not in ITERATIVE_POWERS:
        return exact_candidate(stats, variant, options)
    dtype = compute_dtype or stats.dtype
    if dtype == torch.float64 and stats.device.type == "mps":  # no float64 there
        dtype = stats.dtype
    with highest_matmul_precision():
        weight, bound = iterative_weight(stats.to(dtype), power, options.eps, squarings=squarings,
                                         sqrt_steps=sqrt_steps, sqrt_floor=sqrt_floor)
    if dtype != stats.dtype:
        # Rounding to the statistics' dtype moves W by u/2 of ||W|| <= (1 + bound) ||W_exact||.
        weight = weight.to(stats.dtype)
        bound = bound + torch.finfo(stats.dtype).eps / 2 * (1 + bound)
    return weight, all_finite(weight) & (bound <= tol)


def thorough_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """The iterative options of the refresh after a refused one: as certain, more accurate, no host read.

    Computed in float64 (where the device has it; MPS does not), with
    `THOROUGH_EXTRA_SQUARINGS` more squarings and at least the square-root steps the
    schedule needs to converge (`_converged_steps`), cast back to the statistics'
    dtype (the cast's rounding is added to the bound) and accepted under the same ``tol``.
    The floor stays: a lower one, or steps past convergence, make the certificate worse on
    rank-deficient statistics (measured in ``tests/test_refresh.py``). Its square-root
    shift is float64's (`SHIFT_UNITS`), far below the ~-1e-7 eigenvalues that rounding
    can leave in float32 statistics: where those are deep enough to make the iteration
    diverge, the residual certifies it, the candidate is refused and the exact rule follows.
    """
    options = {**ITERATIVE_DEFAULTS, **options}
    return {**options, "squarings": options["squarings"] + THOROUGH_EXTRA_SQUARINGS,
            "sqrt_steps": max(options["sqrt_steps"], _converged_steps(options["sqrt_floor"])),
            "compute_dtype": torch.float64}


def iterative_weight(stats: Tensor, power: float, eps: float, *, squarings: int, sqrt_steps: int,
                     sqrt_floor: float) -> Tuple[Tensor, Tensor]:
    """``(W, bound)``: the weight for ``p = (max(s, 0) / max s)^power + eps`` and its error bound.

    ``stats`` may be any symmetric matrix: a float32 estimate of a PSD correlation is
    slightly indefinite, and the bound holds against the rule with ``max(s, 0)``
    (DirectCopy's rule keeps ``F``'s negative part, so does its candidate). A candidate
    whose ``lambda_max`` is not bracketed away from 0 (a ``stats`` whose largest
    eigenvalue is not its largest in magnitude, or <= 0) is refused unless ``stats`` is 0.
    """
    dim = stats.shape[-1]
    unit = torch.finfo(stats.dtype).eps
    # the bracket's own rounding: the Rayleigh quotient's dot products (d terms) and the
    # squarings' logarithms, which a tight bracket (gap ~ 0) does not show
    rounding = (dim + squarings + 4) * unit
    lower, upper = top_eigenvalue_bracket(stats, squarings)
    gap = torch.where(lower > 0, (upper - lower) * inverse_or_zero(lower),
                      torch.where(upper > 0, math.inf, 0.0))
    eye = torch.eye(dim, dtype=stats.dtype, device=stats.device)
    if power == 1.0:
        # ||W - W_exact|| = ||F / lambda_max|| (lambda_max / lower - 1); ||F / lambda_max + eps I||^2
        # = ||F / lambda_max||^2 (1 + 2 (t / n) x + d x^2) with t = tr F, n = ||F||, x >= 0, whose
        # minimum is 1 - (t / n)^2 / d >= 0 when t < 0: the relative error is at most gap / sqrt(that).
        trace = stats.diagonal().sum().clamp_max(0)
        norm = stats.norm()
        floor = 1 - (trace * inverse_or_zero(norm)).square() / dim
        ratio = torch.where(floor > 0, floor.clamp_min(torch.finfo(stats.dtype).tiny).rsqrt(), math.inf)
        bound = torch.where(gap > 0, gap * ratio, gap)
        return stats * inverse_or_zero(lower) + eps * eye, bound + rounding * (1 + bound)
    shift = SHIFT_UNITS * unit
    schedule = _sqrt_schedule(sqrt_floor, sqrt_steps)
    scaled = stats * inverse_or_zero(upper)
    shifted = (scaled + shift * eye) / (1 + shift)  # eigenvalues a' in [-1, 1]
    root, inverse = _square_root(shifted, schedule)
    root_error = _square_root_error(shifted, root, inverse, shift / (1 + shift), schedule)
    # root * rescale = sqrt(max(stats, 0) / lower) + (its error, scaled alike), and
    # sqrt(max(stats, 0) / lower) is sqrt(lambda_max / lower) - 1 <= sqrt(upper / lower) - 1 of
    # the rule's sqrt(max(stats, 0) / lambda_max), whose norm is at most ||W_exact||.
    rescale = torch.sqrt(upper * (1 + shift) * inverse_or_zero(lower))
    weight = root * rescale + eps * eye
    # ||W_exact||_F^2 = sum (sqrt(r) + eps)^2 with r = max(s, 0) / lambda_max, the largest r 1
    # (where lambda_max > 0, else the candidate is refused): >= max(sum r, 1) + 2 eps + d eps^2,
    # and sum r = tr(max(stats, 0)) / lambda_max >= tr(stats) / upper
    norm = torch.sqrt(scaled.diagonal().sum().clamp_min(1) + 2 * eps + eps * eps * dim)
    error = rescale * root_error.sqrt() / norm + (torch.sqrt(1 + gap) - 1)
    bound = torch.where(upper > 0, error, torch.zeros_like(error))  # zero statistics: eps I, exactly
    return weight, bound + rounding * (1 + bound)

def top_eigenvalue_bracket(stats: Tensor, squarings: int) -> Tuple[Tensor, Tensor]:
    """Certified ``(lower, upper)`` bounds on the largest eigenvalue of a symmetric ``stats``.

    ``upper`` bounds the spectral radius, so it bounds ``lambda_max`` too; ``lower`` is a
    Rayleigh quotient clamped at 0, so it never exceeds ``lambda_max`` where that is > 0.
    If the eigenvalue of largest magnitude is negative the power singles out its
    eigenvector, ``lower`` is 0 and the candidate is refused.
    """
    tiny = torch.finfo(stats.dtype).tiny
    norm = stats.norm()
    power = stats * inverse_or_zero(norm)
    log_upper = torch.log(norm.clamp_min(tiny))
    for k in range(1, squarings + 1):
        power = _matmul(power, power)
        factor = power.norm()
        power = power * inverse_or_zero(factor)
        log_upper = log_upper + torch.log(factor.clamp_min(tiny)) / 2**k
    upper = torch.where(norm > 0, torch.exp(log_upper), torch.zeros_like(norm))
    # the largest column of a high power lies close to the eigenspace of largest |eigenvalue|
    column = power.index_select(1, power.norm(dim=0).argmax().reshape(1)).squeeze(1)
    column = column * inverse_or_zero(column.norm())
    lower = (column @ _matmul(stats, column)).clamp_min(0)
    return lower, torch.maximum(upper, lower)

def _square_root(a: Tensor, schedule: Tuple[Tuple[float, float], ...]) -> Tuple[Tensor, Tensor]:
    """Coupled Newton-Schulz ``(Y, Z)``: ``Y -> sqrt(a)``, ``Z -> a^(-1/2)`` (without the last step's factor).

    On an eigenvalue ``a`` in ``[0, 1]`` the iterate ``y = sqrt(a) s`` has ``s`` in ``[0, 1]``
    (`_sqrt_schedule`); on ``a < 0`` it diverges (`_negative_part_bound`).
    """
    y: Tensor = a
    z: Optional[Tensor] = None
    p: Optional[Tensor] = None
    for c1, c3 in schedule:
        if p is not None:
            z = p if z is None else _matmul(p, z)
        t = y if z is None else _matmul(z, y)
        p = t * (-c3)
        p.diagonal().add_(c1)
        y = _matmul(y, p)
        y = (y + y.mT) / 2  # products of commuting factors, symmetric up to rounding
    if z is None:
        z = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return y, z

def _square_root_error(a: Tensor, y: Tensor, z: Tensor, shift: float,
                      schedule: Tuple[Tuple[float, float], ...]) -> Tensor:
    """A bound on ``||Y - sqrt(max(a - shift I, 0))||_F^2`` for a symmetric ``a`` with eigenvalues <= 1.

    Per eigenvalue ``a`` of ``a`` (the iterate is ``f(a)``, a polynomial in ``a``), against
    ``sqrt(max(a - shift, 0))``:

    - ``a >= 0``: ``0 <= f <= sqrt(a)``, so where ``f`` is below the target its squared
      error is at most ``a - f^2`` (the trace certificate's term, ``>= 0``), and elsewhere
      at most ``x(a) = (sqrt(a) - sqrt(max(a - shift, 0)))^2``. The ``x`` sum to at most
      ``min(d shift, C shift^2 ||Z||_F^2)`` (`_shift_constant`).
    - ``a < 0``: the squared error is ``f^2``, while the certificate's term is
      ``-(|a| + f^2)``: twice ``N = sum(|a| + f^2)`` is added back, with
      ``N <= psi tr(I - Y Z)`` certified by the residual ``||Y^2 - a||_F >= lambda_max(Y^2 - a)``
      (`_negative_part_bound`): no eigenvalue below ``-m*`` can exist without a residual
      larger than that.

    So ``||Y - target||_F^2 <= |tr(a) - ||Y||_F^2| + 2 psi tr(I - Y Z) + min(...)``: one
    product more than the square root (the residual), the rest traces and norms. The
    shift of `SHIFT_UNITS` rounding units keeps the ~-1e-7 eigenvalues of float32
    statistics out of the diverging range. The certificate, a difference of two sums of
    about ``tr(a)``, counts at least ``u`` times them (below that it is rounding, of either
    sign); otherwise rounding is not bounded separately: the certificate and the residual
    are measured on the computed ``Y`` and ``Z``, so they include the iterate's rounding.
    """
    dim = a.shape[-1]
    square = y.square().sum()
    # a difference of two sums of about tr(a) each: below u tr(a) it is rounding, of either sign
    certificate = (a.diagonal().sum() - square).abs() + torch.finfo(a.dtype).eps * (square + a.diagonal().abs().sum())
    residual = (_matmul(y, y) - a).norm()
    unconverged = (dim - (y * z.mT).sum()).clamp_min(0)  # tr(I - Y Z), from the entries
    negative = _negative_part_bound(residual, schedule) * unconverged
    constant = _shift_constant(shift, schedule) * shift * shift
    shift_cost = (z.square().sum() * constant).clamp_max(dim * shift)
    return certificate + 2 * negative + shift_cost


def uses_iterative(refresh: str, device: torch.device, variant: Variant, options: RuleOptions) -> bool:
    """Whether ``refresh`` computes an iterative candidate for this variant on ``device``.

    ``"auto"`` is chosen by principle, not by timing: on a CPU LAPACK's eigendecomposition
    costs less than the ~40 matrix products of the iterative refresh at every width measured,
    while on an accelerator the eigendecomposition waits for the device (and is slow) and
    matrix products are what it does best. Rules other than spectral powers 1/2 and 1 (eps
    outside) are always exact.
    """
    wanted = refresh == "iterative" or (refresh == "auto" and device.type != "cpu")
    return wanted and variant.power(options) in ITERATIVE_POWERS


def refresh_weight_(weight: Tensor, stats: Tensor, candidate: Callable[..., Candidate], variant: Variant,
                    rule: RuleOptions, *,
                    changed: Tensor, refreshed_at: Tensor, num_updates: Tensor, refresh_rejections: Tensor,
                    ridge: float = 0.0, weight_momentum: float = 0.0) -> Tensor:
    """Recompute ``weight`` in place from ``stats`` with ``candidate``; returns whether it was (0-dim bool).

    The candidate is used where it is certified (or exact) and ``changed`` (the statistics moved
    since the last refresh that applied); a refused candidate leaves ``weight`` and counts in
    ``refresh_rejections``. ``weight_momentum`` averages the new ``W_p`` with the previous one
    after the first refresh. Decided on the device: nothing is read on the host.
    """
    normalised = normalise_statistics(stats, ridge)
    with highest_matmul_precision():  # the exact rules' products too (U diag U^T)
        new, ok = candidate(normalised, variant, rule)
    new = new.to(weight.dtype)
    if weight_momentum:
        none = new.new_zeros(())  # in the weight's dtype: 0.9 in float32 is not 0.9
        momentum = torch.where(refreshed_at > 0, none + weight_momentum, none)
        new = momentum * weight + (1 - momentum) * new
    use = ok & changed
    torch.where(use, new, weight, out=weight)  # in place: no dim x dim temporary
    refreshed_at.copy_(torch.where(use, num_updates, refreshed_at))
    refresh_rejections.add_((changed & ~ok).long())
    return use
