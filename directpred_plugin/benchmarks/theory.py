"""The paper's linear model: when BYOL-style training collapses, and how the predictor prevents it.

What it measures and how is the command's description, ``directpred-bench theory --help``
(``_directpred_bench.THEORY_DESCRIPTION``, written there so that ``--help`` needs no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from directpred_plugin import DirectPredHead
from directpred_plugin.functional import eigenspace_alignment

from .threads import torch_threads

SCHEMA = "directpred-bench/theory/1"


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


# ------------------------------------------------------------------------ scenarios
@dataclass(frozen=True)
class Scenario:
    claim: str
    description: str
    predictor: str
    stop_gradient: bool = True
    expected: str = "no collapse"  # the paper's prediction


SCENARIOS: Dict[str, Scenario] = {
    "no-predictor": Scenario("a", "no predictor (W_p = I)", "identity", expected="collapse"),
    "no-stop-gradient": Scenario("b", "SGD W_p, no stop-gradient (target = W)", "gradient", stop_gradient=False,
                                 expected="collapse"),
    "gradient-predictor": Scenario("c", "SGD-trained W_p", "gradient"),
    "directpred-sqrt": Scenario("c", "DirectPred unnormalised, p_j = sqrt(s_j)", "directpred-sqrt"),
    "directpred": Scenario("c", "DirectPred head as shipped, p_j = sqrt(s_j / max s) + eps: scale pinned near 1, which only this L2 loss penalises (not a bug: no collapse under the cosine loss of BYOL/SimSiam, see below)", "directpred"),
    "symmetric-predictor": Scenario("d", "SGD-trained symmetric W_p", "gradient-symmetric"),
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


DEFAULT_SWEEP_WEIGHT_DECAY = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
DEFAULT_SWEEP_EMA_RATE = [0.005, 0.02, 0.1, 1.0]


def theory(setting: LinearSetting, scenarios: Sequence[str] = tuple(SCENARIOS),
           sweep_weight_decay: Sequence[float] = DEFAULT_SWEEP_WEIGHT_DECAY,
           sweep_ema_rate: Sequence[float] = DEFAULT_SWEEP_EMA_RATE, progress: bool = True) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; expected some of {list(SCENARIOS)}")
    started = time.perf_counter()
    results: Dict[str, Any] = {"schema": SCHEMA, "created": datetime.now().isoformat(timespec="seconds"),
                               "setting": asdict(setting), "scenarios": {}}
    jobs = list(scenarios) + (["sweep"] if sweep_weight_decay and sweep_ema_rate else [])
    for name in tqdm(jobs, desc="theory", disable=not progress, dynamic_ncols=True):
        if name == "sweep":
            grid = [(wd, ema) for ema in sweep_ema_rate for wd in sweep_weight_decay]
            out = simulate(replace(setting), "gradient", weight_decay=[g[0] for g in grid],
                           ema_rate=[g[1] for g in grid])
            out.pop("curves")
            results["sweep"] = out
            continue
        scenario = SCENARIOS[name]
        out = simulate(setting, scenario.predictor, stop_gradient=scenario.stop_gradient)
        results["scenarios"][name] = {**asdict(scenario), **out}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


# ------------------------------------------------------------------------- outputs
def markdown(results: Dict[str, Any]) -> str:
    s = results["setting"]
    lines = [
        f"Linear BYOL model: dim {s['dim']}, batch {s['batch']}, {s['steps']} SGD steps, lr {s['lr']}, "
        f"weight decay {s['weight_decay']}, EMA rate {s['ema_rate']}, augmentation noise sigma^2 = {s['noise']}, "
        f"{s['runs']} runs (seed {s['seed']}).",
        "",
        "| claim | scenario | expected | measured | ‖W‖ end / start | late d ln‖W‖ per 1k steps "
        "| alignment start → end |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for name, r in results["scenarios"].items():
        measured = sorted(set(r["verdict"]))
        alignment = ("– (W_p = I)" if r["predictor"] == "identity" else
                     f"{_range(r['initial_alignment'], '.2f')} → {_range(r['final_alignment'], '.3f')}")
        lines.append(
            f"| ({r['claim']}) | {r['description']} | {r['expected']} | {' / '.join(measured)} "
            f"| {_range(r['norm_ratio'], '.3g')} | {_range(r['late_log_rate_per_1k_steps'], '+.3f')} "
            f"| {alignment} |"
        )
    lines += [
        "",
        f"Verdict `collapse`: ‖W‖ ended below {COLLAPSE_RATIO} of its start, or was still shrinking faster than "
        f"e^({COLLAPSE_RATE}) per 1000 steps over the last quarter. Ranges are min–max over runs. Alignment: "
        "eigenspace alignment of W_p with F = (1 + sigma^2) W W^T (NaN once W is 0).",
    ]
    sweep = results.get("sweep")
    if sweep:
        wds = sorted(set(sweep["weight_decay"]))
        emas = sorted(set(sweep["ema_rate"]))
        threshold = 1 / (4 * (1 + s["noise"]))
        lines += ["", "(e) SGD-trained W_p: ‖W‖ end / start (`C` = collapse) by weight decay eta (columns) and EMA "
                  "rate beta (rows; 1 = no EMA, the target is a copy of W). Along an eigen-direction with predictor "
                  "eigenvalue p, W grows or shrinks with p (tau - (1 + sigma^2) p) - eta, tau = W_a / W; with "
                  f"tau = 1 that is positive for some p only if eta < 1 / (4 (1 + sigma^2)) = {threshold:.3g}.", "",
                  "| beta \\ eta | " + " | ".join(f"{w:g}" for w in wds) + " |",
                  "|---|" + "---:|" * len(wds)]
        cells = {(w, e): (r, v) for w, e, r, v in zip(sweep["weight_decay"], sweep["ema_rate"],
                                                     sweep["norm_ratio"], sweep["verdict"])}
        for e in emas:
            row = []
            for w in wds:
                ratio, v = cells[(w, e)]
                row.append(f"{ratio:.2g}{' C' if v == 'collapse' else ''}")
            lines.append(f"| {e:g} | " + " | ".join(row) + " |")
    lines += ["", f"Total {results['seconds']} s."]
    return "\n".join(lines) + "\n"


def _range(values: Sequence[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    lo, hi = min(finite), max(finite)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}–{format(hi, fmt)}"


def plot(results: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results.get("sweep")
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(15 if sweep else 10, 4))
    for i, (name, r) in enumerate(results["scenarios"].items()):
        steps = np.array(r["curves"]["step"])
        norms = np.array(r["curves"]["norm"])
        norms = norms / norms[:1]
        align = np.array(r["curves"]["alignment"])
        label = f"({r['claim']}) {name}"
        axes[0].plot(steps, norms.mean(1), color=f"C{i}", label=label)
        axes[0].fill_between(steps, norms.min(1), norms.max(1), color=f"C{i}", alpha=0.15, lw=0)
        if r["predictor"] != "identity":
            finite = np.where(np.isfinite(align), align, 0.0).sum(1)
            count = np.isfinite(align).sum(1)
            mean = np.where(count > 0, finite / np.maximum(count, 1), np.nan)  # NaN once every run collapsed
            axes[1].plot(steps + 1, mean, color=f"C{i}", label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylim(1e-4, 3)
    axes[0].set_title("‖W‖_F / its initial value (log; below the axis = collapsed)")
    axes[1].set_xscale("log")
    axes[1].set_title("eigenspace alignment of W_p with F")
    axes[1].set_ylim(0, 1.05)
    axes[0].set_xlabel("SGD step")
    axes[1].set_xlabel("SGD step + 1 (log)")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].legend(fontsize=7, loc="lower right")
    if sweep:
        wds = sorted(set(sweep["weight_decay"]))
        emas = sorted(set(sweep["ema_rate"]))
        grid = np.full((len(emas), len(wds)), np.nan)
        for w, e, ratio in zip(sweep["weight_decay"], sweep["ema_rate"], sweep["norm_ratio"]):
            grid[emas.index(e), wds.index(w)] = np.log10(max(ratio, 1e-12))
        image = axes[2].imshow(grid, cmap="viridis", aspect="auto", origin="lower", vmin=-6, vmax=1)
        for w, e, v in zip(sweep["weight_decay"], sweep["ema_rate"], sweep["verdict"]):
            if v == "collapse":
                axes[2].text(wds.index(w), emas.index(e), "C", ha="center", va="center", color="w")
        axes[2].set_xticks(range(len(wds)))
        axes[2].set_xticklabels([f"{w:g}" for w in wds])
        axes[2].set_yticks(range(len(emas)))
        axes[2].set_yticklabels([f"{e:g}" for e in emas])
        axes[2].set_xlabel("weight decay eta")
        axes[2].set_ylabel("EMA rate beta")
        axes[2].set_title("(e) log10 ‖W‖ end / start, SGD W_p (C = collapse)")
        fig.colorbar(image, ax=axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: Dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "theory.json").write_text(json.dumps(results, indent=2))
    (out / "theory.md").write_text(markdown(results))
    plot(results, out / "theory.png")


# ----------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> Dict[str, Any]:
    for name in ("dim", "batch", "steps", "runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    setting = LinearSetting(dim=args.dim, batch=args.batch, steps=args.steps, lr=args.lr,
                            weight_decay=args.weight_decay, ema_rate=args.ema_rate, noise=args.noise,
                            runs=args.runs, seed=args.seed, record_every=max(1, min(50, args.steps // 20)))
    results = theory(setting, args.scenarios, args.sweep_weight_decay, args.sweep_ema_rate,
                     progress=not args.no_progress)
    out = args.out or Path("runs") / f"theory-{datetime.now():%Y%m%d-%H%M%S}"
    write_outputs(results, out)
    print(markdown(results))
    print(f"Wrote {out}/theory.json, theory.md, theory.png")
    return results
