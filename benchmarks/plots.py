"""PNG plots of ``compare`` results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _predictors(results: Dict[str, Any]) -> List[str]:
    return [row["predictor"] for row in results["summary"]]


def plot_accuracy(results: Dict[str, Any], path: Path) -> None:
    """kNN and linear-probe top-1 per predictor: mean +- std over seeds, dots = individual seeds."""
    plt = _pyplot()
    names = _predictors(results)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(names) + 2.5), 3.8), sharey=True)
    for ax, key, title in zip(axes, ("knn_top1", "linear_top1"), ("kNN top-1", "linear probe top-1")):
        for i, name in enumerate(names):
            values = 100 * np.array([r[key] for r in results["runs"] if r["predictor"] == name])
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.errorbar(i, values.mean(), yerr=std, fmt="o", ms=8, color=f"C{i}", capsize=4, zorder=2)
            ax.scatter(np.full(len(values), i + 0.18), values, color="k", s=10, zorder=3)
        base = [100 * b[key] for b in results.get("untrained", [])]
        if base:
            ax.axhline(float(np.mean(base)), color="gray", ls="--", lw=1, label="untrained backbone")
            ax.legend(loc="lower left", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("top-1 on the test images (%)")
    seeds = len(results["config"]["seeds"])
    fig.suptitle(f"{_title(results)}: marker and bar = mean ± std over {seeds} seed{'s' if seeds > 1 else ''}, "
                 "black dots = single seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: Dict[str, Any], path: Path) -> None:
    """Per epoch: training loss, collapse indicator and effective rank of the online projections.

    Line = mean over seeds, shaded band = min..max over seeds.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    keys = ("loss", "collapse", "effective_rank")
    for i, name in enumerate(_predictors(results)):
        runs = [r for r in results["runs"] if r["predictor"] == name]
        epochs = runs[0]["history"]["epoch"]
        for ax, key in zip(axes, keys):
            if key not in runs[0]["history"]:
                continue
            values = np.array([r["history"][key] for r in runs])
            ax.plot(epochs, values.mean(0), color=f"C{i}", label=name, marker="o" if len(epochs) < 10 else None)
            ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{i}", alpha=0.15, lw=0)
    dim = results["config"]["proj_dim"]
    axes[0].set_title("training loss (negative cosine)\nlowest is not best: a collapsed model reaches -1", fontsize=9)
    axes[0].set_ylabel("loss")
    axes[1].set_title("collapse indicator (higher = less collapse)", fontsize=9)
    axes[1].set_ylabel("mean std of l2-normalised projections")
    axes[1].axhline(results["collapse_isotropic_max"], color="gray", ls="--", lw=1, label=f"1/sqrt({dim}): isotropic")
    axes[1].set_ylim(bottom=0)  # from 0 (complete collapse), so small differences near the maximum look small
    axes[2].set_title("effective rank (also sees dimensional collapse)", fontsize=9)
    axes[2].set_ylabel(f"effective rank of projections (max {dim})")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    seeds = len(results["config"]["seeds"])
    fig.suptitle(f"{_title(results)}: line = mean over {seeds} seed{'s' if seeds > 1 else ''}, "
                 "band = min..max over seeds; measured on each epoch's augmented training views "
                 "(the results table: test images)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probes(results: Dict[str, Any], path: Path) -> None:
    """Probe top-1 on the test images vs epoch per predictor: line = mean over seeds, band = min..max,
    dashed line = the untrained backbone (mean over seeds). kNN; linear too when it was fitted
    at more than the final epoch."""
    plt = _pyplot()
    runs = [r for r in results["runs"] if r.get("probes")]
    keys = [("knn_top1", "kNN top-1")]
    if results["config"].get("probe_linear"):
        keys.append(("linear_top1", "linear probe top-1"))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.4), sharey=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for i, name in enumerate(_predictors(results)):
            mine = [r["probes"] for r in runs if r["predictor"] == name]
            if not mine:
                continue
            epochs = mine[0]["epoch"]
            values = 100 * np.array([p[key] for p in mine], dtype=float)
            ax.plot(epochs, values.mean(0), color=f"C{i}", label=name, marker="o" if len(epochs) < 12 else None)
            ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{i}", alpha=0.15, lw=0)
        base = [100 * b[key] for b in results.get("untrained", [])]
        if base:
            ax.axhline(float(np.mean(base)), color="gray", ls="--", lw=1, label="untrained backbone")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("top-1 on the test images (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    seeds = len(results["config"]["seeds"])
    fig.suptitle(f"{_title(results)}: probes along training\nline = mean over {seeds} "
                 f"seed{'s' if seeds > 1 else ''}, band = min..max over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(results: Dict[str, Any]) -> str:
    cfg = results["config"]
    method = {"byol": "BYOL", "simsiam": "SimSiam"}.get(cfg.get("method", "byol"), cfg.get("method"))
    return f"{method} on {cfg['dataset']} ({cfg['backbone']}, {cfg['epochs']} epochs)"
