"""``compare``'s outputs: the per-predictor summary, and the run folder
(``results.json``, ``results.csv``, ``results.md``, ``accuracy.png``, ``curves.png`` and, with
probes along training, ``probes.png``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

SCHEMA = "directpred-bench/compare/2"


def summarize(runs: Sequence[Dict[str, Any]], predictors: Sequence[str]) -> List[Dict[str, Any]]:
    metrics = ("knn_top1", "linear_top1", "collapse", "effective_rank", "alignment", "ms_per_step",
               "peak_memory_mib", "job_seconds")
    rows = []
    for name in predictors:
        mine = [r for r in runs if r["predictor"] == name]
        if not mine:
            continue
        row: Dict[str, Any] = {"predictor": name, "seeds": len(mine), "predictor_params": mine[0]["predictor_params"]}
        for key in metrics:
            row[f"{key}_mean"], row[f"{key}_std"] = _spread([r[key] for r in mine])
        rows.append(row)
    return rows


CSV_COLUMNS = [
    "method", "predictor", "seed", "knn_top1", "linear_top1", "collapse", "effective_rank", "alignment", "steps",
    "train_seconds", "job_seconds", "ms_per_step", "peak_memory_mib", "memory_kind", "predictor_params",
    "predictor_buffers",
]


def gain_over_untrained(results: Dict[str, Any], predictor: str, key: str) -> Tuple[Optional[float], Optional[float]]:
    """Mean and std over seeds of ``key`` minus the untrained backbone's of the same seed.

    Seeds move the untrained backbone's accuracy by more than predictors differ, so the
    paired difference is the fairer comparison.
    """
    base = {b["seed"]: b[key] for b in results.get("untrained") or ()}
    return _spread([r[key] - base[r["seed"]] for r in results["runs"]
                    if r["predictor"] == predictor and r["seed"] in base and r[key] is not None])


def _fmt(mean: Optional[float], std: Optional[float], scale: float = 1.0, digits: int = 1,
         signed: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{scale * mean:{'+' if signed else ''}.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def markdown_table(results: Dict[str, Any]) -> str:
    cfg = results["config"]
    machine = results["machine"]
    memory_kind = results["runs"][0]["memory_kind"] if results["runs"] else ""
    subset = f"the first {cfg['subset']:,} training images" if cfg.get("subset") else "all training images"
    lines = [
        f"{METHOD_TITLES.get(cfg['method'], cfg['method'])} on `{cfg['dataset']}` ({subset}) with a "
        f"`{cfg['backbone']}` backbone via `{cfg['framework']}`, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
        f"projection dim {cfg['proj_dim']} (hidden {cfg['hidden_dim']}); mean ± std over seeds {cfg['seeds']}"
        + ("" if results.get("complete", True) else
           f" (**incomplete: {len(results['runs'])} of {results['planned_runs']} runs so far**)") + ".",
        "",
        f"| predictor | kNN top-1 (%) | linear top-1 (%) | kNN − untrained | linear − untrained | collapse "
        f"| effective rank (of {cfg['proj_dim']}) | alignment | ms / step | s / run | peak mem (MiB) | predictor params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["summary"]:
        lines.append(
            f"| {row['predictor']} | {_fmt(row['knn_top1_mean'], row['knn_top1_std'], 100)} "
            f"| {_fmt(row['linear_top1_mean'], row['linear_top1_std'], 100)} "
            f"| {_fmt(*gain_over_untrained(results, row['predictor'], 'knn_top1'), 100, signed=True)} "
            f"| {_fmt(*gain_over_untrained(results, row['predictor'], 'linear_top1'), 100, signed=True)} "
            f"| {_fmt(row['collapse_mean'], row['collapse_std'], digits=4)} "
            f"| {_fmt(row['effective_rank_mean'], row['effective_rank_std'])} "
            f"| {_fmt(row['alignment_mean'], row['alignment_std'], digits=3)} "
            f"| {_fmt(row['ms_per_step_mean'], row['ms_per_step_std'])} "
            f"| {_fmt(row['job_seconds_mean'], None, digits=0)} "
            f"| {_fmt(row['peak_memory_mib_mean'], None, digits=0)} | {row['predictor_params']:,} |"
        )
    base = results["untrained"]
    if base:
        def stats(key: str) -> Tuple[Optional[float], Optional[float]]:
            return _spread([b[key] for b in base])

        # No collapse value: an untrained projector's BatchNorm running statistics are still
        # the initial ones, so its eval-mode projections say nothing about collapse.
        lines.append(
            f"| *untrained backbone* | {_fmt(*stats('knn_top1'), 100)} | {_fmt(*stats('linear_top1'), 100)} "
            "| – | – | – | – | – | – | – | – | – |"
        )
    lines += [
        "",
        "kNN top-1, linear top-1: probes (kNN and logistic regression) fit on the backbone features of the "
        "clean training images, scored on the test images. "
        "kNN − untrained, linear − untrained: each run's accuracy minus that of the untrained backbone "
        "of the same seed (points), mean ± std over seeds. "
        f"collapse: mean std of the l2-normalised projections of the test images (isotropic maximum "
        f"1/sqrt({cfg['proj_dim']}) = {results['collapse_isotropic_max']:.4f}, 0 = complete collapse). "
        "effective rank: exp of the entropy of the normalised singular values of the centred test projections "
        f"(1 = all on one line, {cfg['proj_dim']} = isotropic); it also falls when the projections collapse onto a few "
        "dimensions while still varying, which the collapse column cannot see. "
        "alignment: eigenspace alignment of the final `W_p` with the correlation of the projections of the "
        "training images (linear predictors only). The per-epoch curves (curves.png) are measured during "
        "training, on the online projections of the augmented training views. ms / step: wall time of a training step including "
        "augmentation. s / run: wall time of one run (training, then embedding and probes). "
        f"peak mem: {memory_kind.replace('_', ' ')}"
        + (" (cumulative over the runs of one process)" if memory_kind == "cpu_process_max_rss" else "") + ".",
        "",
        f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
        f"device {machine.get('device')}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + (f"; load average {machine['load_average_1_5_15min_at_start']} at start"
           + (f", {machine['load_average_1_5_15min_at_end']} at end" if machine.get("load_average_1_5_15min_at_end")
              else "")
           if "load_average_1_5_15min_at_start" in machine else "")
        + f"; {cfg.get('jobs', 1)} run(s) in parallel, {cfg.get('threads')} thread(s) each"
        + (f"; total {machine['total_seconds']} s." if results.get("complete", True)
           else f"; {machine.get('total_seconds', 0)} s so far (run incomplete)."),
    ]
    lines += probe_table(results)
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def terminal_summary(results: Dict[str, Any]) -> str:
    """A few lines for the terminal: kNN and linear top-1 per predictor and the best of each;
    ``results.md`` has every column and its explanation."""
    rows = [(row["predictor"], _fmt(row["knn_top1_mean"], row["knn_top1_std"], 100),
             _fmt(row["linear_top1_mean"], row["linear_top1_std"], 100)) for row in results["summary"]]
    if results["untrained"]:
        rows.append(("untrained backbone", _fmt(*_spread([b["knn_top1"] for b in results["untrained"]]), 100),
                     _fmt(*_spread([b["linear_top1"] for b in results["untrained"]]), 100)))
    rows.insert(0, ("predictor", "kNN", "linear"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    seeds = results["config"]["seeds"]
    lines = [f"Top-1 (%) on the test images, mean ± std over seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(map(str, seeds))} (every column in results.md):"]
    lines += [f"  {name:<{widths[0]}}  {knn:>{widths[1]}}  {linear:>{widths[2]}}" for name, knn, linear in rows]
    best = []
    for key, label in (("knn_top1", "kNN"), ("linear_top1", "linear")):
        scored = [row for row in results["summary"] if row[f"{key}_mean"] is not None]
        if scored:
            top = max(scored, key=lambda row: row[f"{key}_mean"])
            best.append(f"{label} {top['predictor']} ({100 * top[f'{key}_mean']:.1f}%)")
    if best:
        lines.append("Best: " + ", ".join(best))
    return "\n".join(lines)


def _spread(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample std of the finite values (std None for fewer than two; both None for none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def probe_table(results: Dict[str, Any]) -> List[str]:
    """Markdown lines: kNN and linear top-1 at every probe epoch per predictor
    (none when the runs recorded no probes along training)."""
    runs = [r for r in results["runs"] if r.get("probes")]
    if not runs:
        return []
    epochs = runs[0]["probes"]["epoch"]
    header = [f"{probe}, epoch {epoch}" for probe in ("kNN", "linear") for epoch in epochs]
    lines = [
        "",
        f"Along training (probes.png): top-1 (%) after each probe epoch (the last, {epochs[-1]}, is the final "
        "evaluation), probes fit on the clean training images and scored on the test images; mean ± std over seeds.",
        "",
        "| predictor | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(header),
    ]
    for row in results["summary"]:
        mine = [r["probes"] for r in runs if r["predictor"] == row["predictor"]]
        cells = [_fmt(*_spread([p[key][at] for p in mine]), 100)
                 for key in ("knn_top1", "linear_top1") for at in range(len(epochs))]
        lines.append(f"| {row['predictor']} | " + " | ".join(cells) + " |")
    base = results.get("untrained") or ()
    if base:
        knn, linear = (_fmt(*_spread([b[key] for b in base]), 100) for key in ("knn_top1", "linear_top1"))
        lines.append("| *untrained backbone* | " + " | ".join([knn] * len(epochs) + [linear] * len(epochs)) + " |")
    if not results["config"].get("probe_linear"):
        lines += ["", "Linear probe before the final epoch: not fitted (`--probe-linear` fits it)."]
    return lines


METHOD_TITLES = {"byol": "BYOL", "simsiam": "SimSiam"}


def write_outputs(results: Dict[str, Any], out: Path, plots: bool = True) -> None:
    """Write the run folder; ``plots=False`` skips the PNGs (the partial saves after each run)."""
    from .plots import accuracy_figure, curves_figure, probes_figure, save

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for run in results["runs"]:
            writer.writerow({"method": results["config"]["method"], **run})
    (out / "results.md").write_text(markdown_table(results))
    if not plots or not results["runs"]:
        return
    save(accuracy_figure(results), out / "accuracy.png")
    save(curves_figure(results), out / "curves.png")
    if any(r.get("probes") for r in results["runs"]):
        save(probes_figure(results), out / "probes.png")


