"""A deliberately plain NumPy float64 re-statement of the DirectPred recurrence.

Tests compare :class:`directpred_plugin.DirectPredHead` against this, never against itself.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


def directpred_matrix(m: np.ndarray, eps: float) -> np.ndarray:
    s, u = np.linalg.eigh(m)
    top = s.max()
    ratio = np.maximum(s, 0) / top if top > 0 else np.zeros_like(s)
    p = np.sqrt(ratio) + eps
    return u @ np.diag(p) @ u.T


def directcopy_matrix(m: np.ndarray, eps: float) -> np.ndarray:
    top = np.linalg.eigvalsh(m).max()
    scaled = m / top if top > 0 else np.zeros_like(m)
    return scaled + eps * np.eye(len(m))


RULES = {"directpred": directpred_matrix, "directcopy": directcopy_matrix}


class ReferenceHead:
    """Per-update rule: output with current W, EMA of the correlation, refresh every `freq` updates."""

    def __init__(self, dim: int, rho=0.3, eps=0.01, freq=1, variant="directpred", center=False):
        self.rho, self.eps, self.freq, self.center = rho, eps, freq, center
        self.rule = RULES[variant]
        self.F: Optional[np.ndarray] = None
        self.mu: Optional[np.ndarray] = None
        self.W = np.eye(dim)
        self.updates = 0

    def output(self, z: np.ndarray) -> np.ndarray:
        return z @ self.W.T

    def fold(self, z: np.ndarray) -> None:
        """Fold a batch (rows of `z`) into the estimate; a batch with NaN/inf is ignored."""
        z = np.asarray(z, dtype=np.float64)
        if not np.isfinite(z).all() or len(z) == 0:
            return
        c = z.T @ z / len(z)
        m = z.mean(axis=0)
        if self.F is None:
            self.F, self.mu = c, m
        else:
            self.F = self.rho * self.F + (1 - self.rho) * c
            self.mu = self.rho * self.mu + (1 - self.rho) * m
        self.updates += 1
        if self.updates % self.freq == 0:
            target = self.F - np.outer(self.mu, self.mu) if self.center else self.F
            self.W = self.rule(target, self.eps)

    def run(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
        outputs = []
        for z in batches:
            outputs.append(self.output(z))
            self.fold(z)
        return outputs


# --- matrix-product predictors ("The Edge of Orthogonality", Richemond et al. 2023) ---


def coupled_newton_schulz(a: np.ndarray, steps: int):
    """(A_n, B_n) from A_0 = a, B_0 = I, T = (3I - B A) / 2, A <- A T, B <- T B."""
    b = np.eye(len(a))
    for _ in range(steps):
        t = (3 * np.eye(len(a)) - b @ a) / 2
        a, b = a @ t, t @ b
    return a, b


def ns_sqrt(sigma: np.ndarray, steps: int = 9) -> np.ndarray:
    f = np.linalg.norm(sigma)
    if f == 0:
        return np.zeros_like(sigma)
    return coupled_newton_schulz(sigma / f, steps)[0] * np.sqrt(f)


def ns_fourth_root(sigma: np.ndarray, steps: int = 7) -> np.ndarray:
    return ns_sqrt(ns_sqrt(sigma, steps), steps)


def stiefel(sigma: np.ndarray, steps: int = 9) -> np.ndarray:
    gram = sigma.T @ sigma
    f = np.linalg.norm(gram)
    if f == 0:
        return np.zeros_like(sigma)
    b = coupled_newton_schulz(gram / f, steps)[1]
    return b @ sigma.T / np.linalg.norm(b)


def visser(sigma: np.ndarray, steps: int = 9, eta: float = 0.5) -> np.ndarray:
    f = np.linalg.norm(sigma)
    if f == 0:
        return np.zeros_like(sigma)
    a, p = sigma / f, np.eye(len(sigma)) / (2 * eta)
    for _ in range(steps):
        p = p + eta * (a - p @ p)
    return p * np.sqrt(f)


def neumann(z: np.ndarray, z_target: np.ndarray) -> np.ndarray:
    n = len(z)
    return 2 * z.T @ z_target / n - (z.T @ z / n) @ (z.T @ z_target / n)


def directset_matrix(m: np.ndarray, eps: float, alpha: float, eps_inside: bool = False) -> np.ndarray:
    """DirectSet(alpha): U diag((max(s, 0) / max s)^alpha + eps) U^T, or eps inside the power."""
    s, u = np.linalg.eigh(m)
    top = s.max()
    ratio = np.maximum(s, 0) / top if top > 0 else np.zeros_like(s)
    p = (ratio + eps) ** alpha if eps_inside else ratio**alpha + eps
    return u @ np.diag(p) @ u.T


def normalised(m: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """The statistics every rule reads: divided by the largest absolute entry, plus ridge * I."""
    top = np.abs(m).max()
    return (m / top if top > 0 else m) + ridge * np.eye(len(m))


class PooledReferenceHead:
    """The pipeline's schedule, restated plainly.

    ``calls_per_update`` calls pool their rows into one update; a pool with a NaN/inf, or
    whose sums exceed ``max_value`` (the largest finite value of the head's statistics
    dtype: sums that overflow only once pooled), is skipped; a pool without rows changes
    nothing. Every closed pool is a step, skipped and empty ones included; every
    ``freq``-th step refreshes ``W`` if ``F`` changed since the last refresh that was used.
    The head normalises ``F`` by its largest entry before the rule: no change in exact
    arithmetic, every rule here is scale-free, so this reference does not.
    """

    def __init__(self, dim: int, rho=0.3, eps=0.01, freq=1, variant="directpred", center=False,
                 alpha=0.5, calls_per_update=1, max_value=np.inf):
        self.dim, self.rho, self.eps, self.freq, self.center = dim, rho, eps, freq, center
        self.variant, self.alpha, self.calls_per_update, self.max_value = variant, alpha, calls_per_update, max_value
        self.F = np.zeros((dim, dim))
        self.mu = np.zeros(dim)
        self.W = np.eye(dim)
        self.updates = self.skipped = self.steps = self.refreshed_at = 0
        self._pool: List[np.ndarray] = []
        self.refreshed_now = False  # did the last call's step refresh W

    def output(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) @ self.W.T

    def target(self) -> np.ndarray:
        return self.F - np.outer(self.mu, self.mu) if self.center else self.F

    def rule(self, m: np.ndarray) -> np.ndarray:
        if self.variant == "directset":
            return directset_matrix(m, self.eps, self.alpha)
        return RULES[self.variant](m, self.eps)

    def call(self, z: np.ndarray) -> None:
        """A training-mode call: pool the rows, close the pool after ``calls_per_update`` calls."""
        self.refreshed_now = False
        self._pool.append(np.asarray(z, dtype=np.float64).reshape(-1, self.dim))
        if len(self._pool) == self.calls_per_update:
            self._close()

    def _close(self) -> None:
        rows = np.concatenate(self._pool)
        self._pool = []
        self.steps += 1
        with np.errstate(all="ignore"):
            outer, total = rows.T @ rows, rows.sum(axis=0)
        finite = np.isfinite(outer).all() and np.isfinite(total).all()
        if not finite or np.abs(outer).max(initial=0) > self.max_value or np.abs(total).max(initial=0) > self.max_value:
            self.skipped += 1
        elif len(rows):
            c, m = outer / len(rows), total / len(rows)
            keep = 0.0 if self.updates == 0 else self.rho
            self.F = keep * self.F + (1 - keep) * c
            self.mu = keep * self.mu + (1 - keep) * m
            self.updates += 1
        if self.steps % self.freq == 0 and self.updates > self.refreshed_at:
            self.W = self.rule(self.target())
            self.refreshed_at = self.updates
            self.refreshed_now = True

    def reject_last_refresh(self, previous_w: np.ndarray, previous_refreshed_at: int) -> None:
        """The head refused the refresh just made (an iterative result above its bound)."""
        self.W, self.refreshed_at, self.refreshed_now = previous_w, previous_refreshed_at, False
