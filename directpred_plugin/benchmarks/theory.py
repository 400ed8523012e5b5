"""The paper's linear model: when BYOL-style training collapses, and how the predictor prevents it.

The paper's claims as scenarios of :mod:`.linear_model` plus a weight-decay x EMA sweep, run
and written as theory.json, .md and .png; the command's description, ``directpred-bench theory
--help`` (``_directpred_bench.THEORY_DESCRIPTION``, there so that ``--help`` needs no torch), says more.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from _directpred_bench import THEORY_SWEEP_EMA_RATE, THEORY_SWEEP_WEIGHT_DECAY

from .linear_model import COLLAPSE_RATE, COLLAPSE_RATIO, LinearSetting, simulate
from .runtime import progress_bar, torch_threads

SCHEMA = "directpred-bench/theory/1"


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


def theory(setting: LinearSetting, scenarios: Sequence[str] = tuple(SCENARIOS),
           sweep_weight_decay: Sequence[float] = THEORY_SWEEP_WEIGHT_DECAY,
           sweep_ema_rate: Sequence[float] = THEORY_SWEEP_EMA_RATE, progress: bool = True) -> Dict[str, Any]:
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; expected some of {list(SCENARIOS)}")
    started = time.perf_counter()
    results: Dict[str, Any] = {"schema": SCHEMA, "created": datetime.now().isoformat(timespec="seconds"),
                               "setting": asdict(setting), "scenarios": {}}
    jobs = list(scenarios) + (["sweep"] if sweep_weight_decay and sweep_ema_rate else [])
    for name in progress_bar(jobs, desc="theory", disable=not progress):
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
        wds, emas, cells = _sweep_cells(sweep)
        threshold = 1 / (4 * (1 + s["noise"]))
        lines += ["", "(e) SGD-trained W_p: ‖W‖ end / start (`C` = collapse) by weight decay eta (columns) and EMA "
                  "rate beta (rows; 1 = no EMA, the target is a copy of W). Along an eigen-direction with predictor "
                  "eigenvalue p, W grows or shrinks with p (tau - (1 + sigma^2) p) - eta, tau = W_a / W; with "
                  f"tau = 1 that is positive for some p only if eta < 1 / (4 (1 + sigma^2)) = {threshold:.3g}.", "",
                  "| beta \\ eta | " + " | ".join(f"{w:g}" for w in wds) + " |",
                  "|---|" + "---:|" * len(wds)]
        for e in emas:
            row = (f"{cells[w, e][0]:.2g}{' C' if cells[w, e][1] == 'collapse' else ''}" for w in wds)
            lines.append(f"| {e:g} | " + " | ".join(row) + " |")
    lines += ["", f"Total {results['seconds']} s."]
    return "\n".join(lines) + "\n"


Cells = Dict[Tuple[float, float], Tuple[float, str]]


def _sweep_cells(sweep: Dict[str, Any]) -> Tuple[List[float], List[float], Cells]:
    """The sweep's weight decays and EMA rates, sorted, and ``(weight decay, EMA rate) -> (‖W‖ end / start,
    verdict)``."""
    cells = {(w, e): (r, v) for w, e, r, v in zip(sweep["weight_decay"], sweep["ema_rate"], sweep["norm_ratio"],
                                                 sweep["verdict"])}
    return sorted({w for w, _ in cells}), sorted({e for _, e in cells}), cells


def _range(values: Sequence[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    lo, hi = min(finite), max(finite)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}–{format(hi, fmt)}"


def plot(results: Dict[str, Any], path: Path) -> None:
    from .plots import pyplot

    plt = pyplot()
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
        wds, emas, cells = _sweep_cells(sweep)
        grid = np.array([[np.log10(max(cells[w, e][0], 1e-12)) for w in wds] for e in emas])
        image = axes[2].imshow(grid, cmap="viridis", aspect="auto", origin="lower", vmin=-6, vmax=1)
        for (w, e), (_, v) in cells.items():
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
