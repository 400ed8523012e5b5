"""PNG plots of ``compare`` results (matplotlib, Agg backend: no display needed).

Each ``*_figure`` function builds a figure, :func:`save` writes it. The figures use
matplotlib's constrained layout with their legends outside the axes, so that a legend never
hides data and the layout makes room for every label and legend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

import numpy as np

from .report import METHOD_TITLES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Below this many points a curve shows its markers, and an epoch axis gets a tick per epoch.
FEW_POINTS = 12


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _predictors(results: Dict[str, Any]) -> List[str]:
    return [row["predictor"] for row in results["summary"]]


def save(fig: "Figure", path: Path) -> None:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _seeds(results: Dict[str, Any]) -> str:
    seeds = len(results["config"]["seeds"])
    return f"{seeds} seed{'s' if seeds != 1 else ''}"


def _epoch_axis(ax: "Axes", last_epoch: int) -> None:
    """Integer epochs on the x axis: one tick per epoch while they are few (one epoch included,
    which matplotlib would otherwise show as fractions around 1)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    if last_epoch < FEW_POINTS:
        ax.set_xticks(range(1, last_epoch + 1))
        ax.set_xlim(0.5, last_epoch + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_right_of(ax: "Axes", handles: list, labels: List[str]) -> None:
    """The legend beside the last panel, its top level with the panel's: outside the data, and
    below the suptitle (a figure legend at "outside right upper" rises into the suptitle's row)."""
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8,
              frameon=False)


def _marker(points: Sequence[Any]) -> Any:
    return "o" if len(points) < FEW_POINTS else None


def accuracy_figure(results: Dict[str, Any]) -> "Figure":
    """kNN and linear-probe top-1 per predictor: mean +- std over seeds, dots = individual seeds."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    names = _predictors(results)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(names) + 2.5), 4.2), sharey=True,
                             layout="constrained")
    for ax, key, title in zip(axes, ("knn_top1", "linear_top1"), ("kNN top-1", "linear probe top-1")):
        for i, name in enumerate(names):
            values = 100 * np.array([r[key] for r in results["runs"] if r["predictor"] == name])
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.errorbar(i, values.mean(), yerr=std, fmt="o", ms=8, color=f"C{i}", capsize=4, zorder=2)
            ax.scatter(np.full(len(values), i + 0.18), values, color="k", s=10, zorder=3)
        base = [100 * b[key] for b in results.get("untrained", [])]
        if base:
            ax.axhline(float(np.mean(base)), color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("top-1 on the test images (%)")
    # One legend for both panels, below them (above, it would share the suptitle's row): what the marks mean.
    marks = [Line2D([], [], color="gray", marker="o", ms=8, ls="", label=f"mean ± std over {_seeds(results)}"),
           Line2D([], [], color="k", marker="o", ms=3, ls="", label="single seeds")]
    if results.get("untrained"):
        marks.append(Line2D([], [], color="gray", ls="--", lw=1, label="untrained backbone (mean over seeds)"))
    fig.legend(handles=marks, loc="outside lower center", ncol=len(marks), fontsize=8, frameon=False)
    fig.suptitle(_title(results), fontsize=10)
    return fig


def curves_figure(results: Dict[str, Any]) -> "Figure":
    """Per epoch: training loss, collapse indicator and effective rank of the online projections.

    Line = mean over seeds, shaded band = min..max over seeds.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    keys = ("loss", "collapse", "effective_rank")
    last_epoch = 1
    for i, name in enumerate(_predictors(results)):
        runs = [r for r in results["runs"] if r["predictor"] == name]
        epochs = runs[0]["history"]["epoch"]
        last_epoch = max(last_epoch, *epochs)
        for ax, key in zip(axes, keys):
            if key not in runs[0]["history"]:
                continue
            values = np.array([r["history"][key] for r in runs])
            ax.plot(epochs, values.mean(0), color=f"C{i}", label=name, marker=_marker(epochs))
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
    for ax in axes:
        _epoch_axis(ax, last_epoch)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    _legend_right_of(axes[-1], handles, labels)
    fig.suptitle(f"{_title(results)}: line = mean over {_seeds(results)}, band = min..max over seeds\n"
                 "measured on each epoch's augmented training views (the results table: test images)", fontsize=10)
    return fig


def probes_figure(results: Dict[str, Any]) -> "Figure":
    """Probe top-1 on the test images vs epoch per predictor: line = mean over seeds, band = min..max,
    dashed line = the untrained backbone (mean over seeds). kNN; linear too when it was fitted
    at more than the final epoch."""
    plt = pyplot()
    runs = [r for r in results["runs"] if r.get("probes")]
    keys = [("knn_top1", "kNN top-1")]
    if results["config"].get("probe_linear"):
        keys.append(("linear_top1", "linear probe top-1"))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys) + 2, 4.6), sharey=True, squeeze=False,
                             layout="constrained")
    last_epoch = max((max(r["probes"]["epoch"]) for r in runs), default=1)
    for ax, (key, title) in zip(axes[0], keys):
        for i, name in enumerate(_predictors(results)):
            mine = [r["probes"] for r in runs if r["predictor"] == name]
            if not mine:
                continue
            epochs = mine[0]["epoch"]
            values = 100 * np.array([p[key] for p in mine], dtype=float)
            ax.plot(epochs, values.mean(0), color=f"C{i}", label=name, marker=_marker(epochs))
            ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{i}", alpha=0.15, lw=0)
        base = [100 * b[key] for b in results.get("untrained", [])]
        if base:
            ax.axhline(float(np.mean(base)), color="gray", ls="--", lw=1, label="untrained backbone")
        ax.set_title(title, fontsize=9)
        _epoch_axis(ax, last_epoch)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 on the test images (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    _legend_right_of(axes[0][-1], handles, labels)
    fig.suptitle(f"{_title(results)}: probes along training\nline = mean over {_seeds(results)}, "
                 "band = min..max over seeds", fontsize=10)
    return fig


def _title(results: Dict[str, Any]) -> str:
    cfg = results["config"]
    method = METHOD_TITLES.get(cfg.get("method", "byol"), cfg.get("method"))
    epochs = cfg["epochs"]
    return f"{method} on {cfg['dataset']} ({cfg['backbone']}, {epochs} epoch{'s' if epochs != 1 else ''})"
