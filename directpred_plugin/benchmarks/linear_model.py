"""The paper's linear BYOL model (Tian, Chen & Ganguli, ICML 2021, Sec. 3), simulated for several runs at once.

The setting, the predictors the simulation can use (:data:`SIMULATED_PREDICTORS`) and the
SGD training of :func:`simulate`, with a collapse verdict on each run; ``theory`` runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from directpred_plugin import DirectPredHead
from directpred_plugin.functional import eigenspace_alignment


@dataclass(frozen=True)
class LinearSetting:
    """Parameters of the linear model and of its SGD training (shared by all scenarios)."""

    dim: int = 8
    batch: int = 128
    steps: int = 2500
    lr: float = 0.2
    weight_decay: float = 0.005
    ema_rate: float = 0.02  # beta: W_a += beta * (W - W_a) every step
    noise: float = 0.25  # sigma^2 of the additive augmentation
    init_scale: float = 1.0  # W starts with N(0, init_scale^2 / dim) entries
    predictor_init_scale: float = 0.1  # a trained W_p starts small and random
    runs: int = 3
    seed: int = 0
    record_every: int = 50


# ----------------------------------------------------------------------- predictors
class IdentityPredictor:
    """No predictor: ``W_p = I``."""

    def __init__(self, runs: int, dim: int, setting: LinearSetting, generator: torch.Generator) -> None:
        self.eye = torch.eye(dim).expand(runs, dim, dim)

    def parameters(self) -> List[Tensor]:
        return []

    def __call__(self, f: Tensor) -> Tensor:
        return f

    def matrix(self) -> Tensor:
        return self.eye


class GradientPredictor:
    """``W_p`` trained by the same SGD as ``W`` (with weight decay), from a small random start."""

    symmetric = False

    def __init__(self, runs: int, dim: int, setting: LinearSetting, generator: torch.Generator) -> None:
        scale = setting.predictor_init_scale / math.sqrt(dim)
        self.raw = (torch.randn(runs, dim, dim, generator=generator) * scale).requires_grad_(True)

    def parameters(self) -> List[Tensor]:
        return [self.raw]

    def matrix(self) -> Tensor:
        return (self.raw + self.raw.mT) / 2 if self.symmetric else self.raw

    def __call__(self, f: Tensor) -> Tensor:
        return f @ self.matrix().mT


class SymmetricGradientPredictor(GradientPredictor):
    """SGD-trained ``W_p = (A + A^T) / 2``: the symmetric predictor of the paper's analysis."""

    symmetric = True


class DirectPredPredictor:
    """One :class:`DirectPredHead` per run, fed the predictor input ``f = W x1`` each step."""

    rescale = False

    def __init__(self, runs: int, dim: int, setting: LinearSetting, generator: torch.Generator) -> None:
        # one call per simulated step, folded at that call (the simulation steps no torch.optim optimizer)
        self.heads = [DirectPredHead(dim, calls_per_update=1) for _ in range(runs)]

    def parameters(self) -> List[Tensor]:
        return []

    def _scale(self, head: DirectPredHead) -> Tensor:
        if not self.rescale or head.num_updates.item() == 0:
            return torch.ones(())
        # W_p in use was computed from the current F_hat, so this is sqrt(max s) of that F_hat.
        return torch.linalg.eigvalsh(head.effective_corr()).max().clamp_min(0).sqrt().float()

    def __call__(self, f: Tensor) -> Tensor:
        return torch.stack([self._scale(head) * head(f[g]) for g, head in enumerate(self.heads)])

    def matrix(self) -> Tensor:
        return torch.stack([self._scale(head) * head.weight.float() for head in self.heads])


class DirectPredSqrtPredictor(DirectPredPredictor):
    """The head's ``W_p`` times ``sqrt(max s)``: the unnormalised ``p_j = sqrt(s_j)`` rule."""

    rescale = True


#: The predictors of the linear-network simulation (not modules of the package: batched over runs).
SIMULATED_PREDICTORS: Dict[str, Callable[..., Any]] = {
    "identity": IdentityPredictor,
    "gradient": GradientPredictor,
    "gradient-symmetric": SymmetricGradientPredictor,
    "directpred": DirectPredPredictor,
    "directpred-sqrt": DirectPredSqrtPredictor,
}


#: Collapse verdict: ||W|| ended below this fraction of its start, or was still shrinking faster
#: than this (log-)rate per 1000 steps over the last quarter of training.
COLLAPSE_RATIO = 0.05
COLLAPSE_RATE = -0.1


def verdict(norm_ratio: float, late_rate: float) -> str:
    return "collapse" if norm_ratio < COLLAPSE_RATIO or late_rate < COLLAPSE_RATE else "no collapse"


def simulate(setting: LinearSetting, predictor: str, *, stop_gradient: bool = True,
             weight_decay: Optional[Sequence[float]] = None, ema_rate: Optional[Sequence[float]] = None
             ) -> Dict[str, Any]:
    """Train ``setting.runs`` independent linear models (or one per ``weight_decay``/``ema_rate`` pair).

    Returns per-run curves of ``||W||_F`` and of the eigenspace alignment of ``W_p`` with the
    correlation ``F = (1 + sigma^2) W W^T`` of the predictor's input, plus final summaries.
    """
    if predictor not in SIMULATED_PREDICTORS:
        raise ValueError(f"predictor must be one of {sorted(SIMULATED_PREDICTORS)}, got {predictor!r}")
    n = setting.dim
    if weight_decay is None:
        weight_decay = [setting.weight_decay] * setting.runs
        ema_rate = [setting.ema_rate] * setting.runs
    if ema_rate is None or len(ema_rate) != len(weight_decay):
        raise ValueError("weight_decay and ema_rate are given together, one value per run")
    runs = len(weight_decay)
    generator = torch.Generator().manual_seed(setting.seed)
    eta = torch.tensor(weight_decay, dtype=torch.float32).view(runs, 1, 1)
    beta = torch.tensor(ema_rate, dtype=torch.float32).view(runs, 1, 1)
    noise_std = math.sqrt(setting.noise)

    W = (torch.randn(runs, n, n, generator=generator) * setting.init_scale / math.sqrt(n)).requires_grad_(True)
    W_target = W.detach().clone()
    head = SIMULATED_PREDICTORS[predictor](runs, n, setting, generator)
    params = [W] + head.parameters()
    curves: Dict[str, List[Any]] = {"step": [], "norm": [], "alignment": []}

    def record(step: int) -> None:
        w = W.detach()
        corr = (1 + setting.noise) * w @ w.mT
        matrix = head.matrix().detach()
        curves["step"].append(step)
        curves["norm"].append(w.flatten(1).norm(dim=1).tolist())
        curves["alignment"].append([float(eigenspace_alignment(matrix[g], corr[g])) for g in range(runs)])

    # Dense records early (alignment settles within tens of steps), then every record_every.
    early = set(np.unique(np.geomspace(1, setting.steps, 30).astype(int)).tolist())
    record(0)
    for step in range(1, setting.steps + 1):
        x = torch.randn(runs, setting.batch, n, generator=generator)
        x1 = x + noise_std * torch.randn(x.shape, generator=generator)
        x2 = x + noise_std * torch.randn(x.shape, generator=generator)
        prediction = head(x1 @ W.mT)
        target = x2 @ (W_target if stop_gradient else W).mT
        # Runs are independent, so summing their losses gives each run its own gradient.
        loss = 0.5 * (prediction - target).pow(2).sum(-1).mean(-1).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param.sub_(setting.lr * (grad + eta * param))
            W_target.add_(beta * (W - W_target))
        if step % setting.record_every == 0 or step == setting.steps or step in early:
            record(step)

    norms = np.array(curves["norm"])  # (records, runs)
    steps = np.array(curves["step"])
    late = steps >= steps[-1] * 0.75
    if late.sum() < 2 and len(steps) >= 2:  # a line needs two points: a short run fits its last two records
        late[-2:] = True
    with np.errstate(divide="ignore"):
        log_norms = np.log(np.maximum(norms[late], 1e-30))
    late_rate = np.polyfit(steps[late] / 1000.0, log_norms, 1)[0]  # per run
    ratio = norms[-1] / norms[0]
    return {
        "curves": curves,
        "norm_ratio": ratio.tolist(),
        "late_log_rate_per_1k_steps": np.atleast_1d(late_rate).tolist(),
        "final_alignment": curves["alignment"][-1],
        "initial_alignment": curves["alignment"][0],
        "verdict": [verdict(r, s) for r, s in zip(ratio, np.atleast_1d(late_rate))],
        "weight_decay": list(weight_decay),
        "ema_rate": list(ema_rate),
    }
