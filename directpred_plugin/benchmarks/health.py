"""Plot the RankMe and eigenspace alignment of DirectPred heads from Lightning metrics.csv files
(``directpred-bench health-plot``; its options are in ``_directpred_bench``).

Reads the ``.../rankme`` and ``.../alignment`` columns that lightly's ``DirectPredDiagnostics``
and solo-learn's ``method_kwargs.directpred.log_every_n_steps`` log through a ``CSVLogger``
(Lightning's default logger where TensorBoard is not installed), one line per head and file,
against the logged step:

    directpred-bench health-plot lightning_logs/version_0/metrics.csv --out health.png
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

#: The diagnostics plotted, left to right: column suffix -> axis title.
PANELS = {"rankme": "RankMe of the projections", "alignment": "eigenspace alignment of W_p with F̂"}
#: Axes drawn over the whole range of the value, where it has one (the alignment lies in [0, 1]).
RANGES = {"alignment": (0.0, 1.05)}

Curve = List[Tuple[int, float]]


def read_health(path: Path) -> Dict[str, Dict[str, Curve]]:
    """``{head: {diagnostic: [(step, value), ...]}}`` from a metrics.csv, rows without the value skipped.

    ``head`` is the column name without its last component, e.g. ``directpred/predictor``.
    Raises ``ValueError`` when the file has no column of :data:`PANELS`.
    """
    curves: Dict[str, Dict[str, Curve]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames or () if c.rpartition("/")[2] in PANELS and "/" in c]
        if not columns:
            raise ValueError(f"{path} has no column ending in {' or '.join('/' + p for p in PANELS)}; log the heads' "
                             "diagnostics (DirectPredDiagnostics, or method_kwargs.directpred.log_every_n_steps)")
        for row in reader:
            for column in columns:
                if row.get(column):
                    head, _, key = column.rpartition("/")
                    value = float(row[column])
                    if math.isfinite(value):
                        curves.setdefault(head, {}).setdefault(key, []).append((int(row["step"]), value))
    return curves


def plot_health(runs: Sequence[Tuple[str, Dict[str, Dict[str, Curve]]]], path: Path,
                title: Optional[str] = None) -> None:
    """One panel per diagnostic of :data:`PANELS`, one line per (run, head)."""
    from .plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.6 * len(PANELS), 3.6))
    for ax, (key, axis_title) in zip(axes, PANELS.items()):
        for label, heads in runs:
            for head, curves in heads.items():
                if key in curves:
                    steps, values = zip(*curves[key])
                    name = head.rpartition("/")[2]
                    ax.plot(steps, values, marker="o", ms=2.5, lw=1.2,
                            label=f"{label}: {name}" if label else name)
        if key in RANGES:
            ax.set_ylim(*RANGES[key])
        ax.set_title(axis_title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    labels = args.labels or [""] * len(args.metrics)
    if len(labels) != len(args.metrics):
        raise ValueError(f"--labels names {len(labels)} runs for {len(args.metrics)} files")
    plot_health([(label, read_health(path)) for label, path in zip(labels, args.metrics)], args.out, args.title)
    print(f"wrote {args.out}")
