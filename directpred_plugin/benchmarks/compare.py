"""Side-by-side BYOL or SimSiam training with each predictor: accuracy, collapse, alignment, cost.

What it measures and how is the command's description, ``directpred-bench compare --help``
(``_directpred_bench.COMPARE_DESCRIPTION``, written there so that ``--help`` needs no torch).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, fields, replace
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .config import CompareConfig
from .predictors import parse_predictor_spec, predictor_spec
from .report import SCHEMA, summarize, terminal_summary, write_outputs
from .timing import machine_description
from .runtime import progress_bar
from .training import Job, load_data, run_job

__all__ = ["CompareConfig", "SCHEMA", "compare", "config_from_args", "run"]


#: Options that change how a study runs but not its numbers: a resumed study may change them.
RESUMABLE_CHANGES = ("jobs", "threads", "progress", "workers")


def compare(cfg: CompareConfig, out: Optional[Path] = None, command: Optional[str] = None,
            resume: bool = False) -> Dict[str, Any]:
    """Train every predictor x seed, evaluate, and write the run folder (when ``out`` is given)
    after every finished run. ``resume``: keep the finished runs of ``out/results.json`` (same
    configuration) and train only the others."""
    cfg.validate()
    device = torch.device(cfg.device)
    data = load_data(cfg)
    cfg = cfg.resolve(data.defaults)
    cfg.validate()
    jobs: List[Job] = []
    for seed in cfg.seeds:
        jobs.append((None, seed))
        jobs += [(name, seed) for name in cfg.predictors]

    results: Dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "complete": False,
        "planned_runs": len(cfg.seeds) * len(cfg.predictors),
        "config": asdict(cfg),
        "predictor_descriptions": {spec: _describe(spec) for spec in cfg.predictors},
        "collapse_isotropic_max": 1 / math.sqrt(cfg.proj_dim),
        "machine": machine_description(device),
        "runs": [],
        "untrained": [],
        "summary": [],
    }
    started = time.perf_counter()
    finished: Dict[Job, Dict[str, Any]] = _finished_runs(results, out) if resume else {}
    results["resumed_runs"] = len(finished)

    def record(job: Optional[Job], result: Optional[Dict[str, Any]]) -> None:
        if job is not None:
            finished[job] = result
        # In job order whatever the completion order, so a parallel run's files equal a serial run's.
        results["runs"] = [finished[j] for j in jobs if j in finished and j[0] is not None]
        results["untrained"] = [finished[j] for j in jobs if j in finished and j[0] is None]
        results["summary"] = summarize(results["runs"], cfg.predictors)
        results["machine"]["total_seconds"] = round(time.perf_counter() - started, 1)
        if out is not None:
            write_outputs(results, Path(out), plots=False)

    if finished:
        record(None, None)
    try:
        _run_jobs(cfg, [job for job in jobs if job not in finished], record)
        results["complete"] = True
    finally:
        if hasattr(os, "getloadavg"):
            results["machine"]["load_average_1_5_15min_at_end"] = [round(v, 2) for v in os.getloadavg()]
        results["machine"]["total_seconds"] = round(time.perf_counter() - started, 1)
        if out is not None and results["runs"]:
            write_outputs(results, Path(out))
    return results


def _finished_runs(results: Dict[str, Any], out: Optional[Path]) -> Dict[Job, Dict[str, Any]]:
    """The runs a previous ``compare`` of the same configuration saved in ``out``."""
    import json

    if out is None:
        raise ValueError("--resume needs --out: the run folder to continue")
    path = Path(out) / "results.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("schema") != SCHEMA:
        raise ValueError(f"--resume: {path} has schema {saved.get('schema')!r}, this version writes {SCHEMA!r}")
    differ = sorted(key for key in set(saved["config"]) | set(results["config"])
                    if key not in RESUMABLE_CHANGES and saved["config"].get(key) != results["config"].get(key))
    if differ:
        raise ValueError(f"--resume: {path} was run with other options ({', '.join(differ)}); "
                         "resume with the same options or choose another --out")
    finished: Dict[Job, Dict[str, Any]] = {(run["predictor"], run["seed"]): run for run in saved["runs"]}
    finished.update({(None, run["seed"]): run for run in saved["untrained"]})
    return finished


def _describe(spec: str) -> str:
    name, options = parse_predictor_spec(spec)
    summary = predictor_spec(spec).summary
    return summary + (f"; options {options}" if options else "")


def _report_line(job: Job, result: Dict[str, Any]) -> str:
    predictor, seed = job
    label = predictor or "untrained backbone"
    line = f"{label:>26} seed {seed}: kNN {100 * result['knn_top1']:.1f}%  linear {100 * result['linear_top1']:.1f}%"
    if predictor is not None:
        line += (f"  collapse {result['collapse']:.4f}  effective rank {result['effective_rank']:.1f}"
                 f"  {result['ms_per_step']:.1f} ms/step")
    return line + f"  ({result['job_seconds']:.0f} s)"


def _run_jobs(cfg: CompareConfig, jobs: List[Job], record) -> None:
    bar = progress_bar(total=len(jobs), desc="compare runs", position=0, disable=not cfg.progress)
    try:
        if cfg.jobs <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.set_postfix(predictor=job[0] or "untrained", seed=job[1])
                result = run_job(cfg, job)
                record(job, result)
                bar.write(_report_line(job, result))
                bar.update()
            return
        # spawn: a fresh interpreter per worker, without the parent's OpenMP state or threads.
        worker_cfg = replace(cfg, progress=False)  # per-epoch bars of several processes would interleave
        with ProcessPoolExecutor(max_workers=min(cfg.jobs, len(jobs)), mp_context=get_context("spawn")) as pool:
            pending: Dict[Future, Job] = {pool.submit(run_job, worker_cfg, job): job for job in jobs}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = pending.pop(future)
                        result = future.result()
                        record(job, result)
                        bar.write(_report_line(job, result))
                        bar.update()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        bar.close()


# ----------------------------------------------------------------------------- CLI
def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The configuration of the options given: every :class:`CompareConfig` field the command line has."""
    given = {f.name: getattr(args, f.name) for f in fields(CompareConfig) if hasattr(args, f.name)}
    given.update(predictors=args.predictors and list(args.predictors), seeds=list(args.seeds),
                 probe_epochs=args.probe_epochs and sorted(set(args.probe_epochs)), progress=not args.no_progress)
    return CompareConfig(**given)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    command = "directpred-bench " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    pictures = "accuracy.png, curves.png" + (", probes.png" if cfg.probe_epochs else "")
    print(f"Writing to {out}/ (results.json, .csv, .md after every run; {pictures} at the end)", flush=True)
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out: the run folder to continue")
    results = compare(cfg, out, command, resume=args.resume)
    print(terminal_summary(results))
    written = ["results.md", "results.json", "results.csv"] + [name for name in pictures.split(", ")
                                                              if (out / name).is_file()]
    print(f"Wrote {out}/: {', '.join(written)}")
    return results
