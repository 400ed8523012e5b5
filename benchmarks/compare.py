"""Side-by-side BYOL or SimSiam training with each predictor: accuracy, collapse, alignment, cost.

Every run trains the same model and changes only the predictor: BYOL (online backbone +
projector + predictor, EMA target, symmetrised negative cosine) or, with ``--method
simsiam``, SimSiam (no target network, stop-gradient on the projections). Defaults run
offline on a laptop CPU: scikit-learn's handwritten digits, a small CNN, 6 predictors x 3
seeds. ``--dataset fashion-mnist`` is the offline benchmark that tells the predictors apart;
``--dataset cifar10|stl10`` with ``--device cuda`` scales the same comparison up.

Predictors are named ``name`` or ``name:key=value,...`` (``directpred:eps=0.1``), so an
option sweep is a list of specs: ``--predictors directpred:eps=0 directpred:eps=0.1``.

Independent runs (predictor x seed, and the untrained baseline per seed) go to ``--jobs``
worker processes of ``--threads`` threads each; a run depends only on its predictor and
seed, so the numbers are those of a serial run. The run folder (``--out``, default
``runs/compare-<time>``) is named at the start and rewritten after every finished run:
``results.json`` (configuration, machine, command, every run with its training curves,
per-predictor summary), ``results.csv`` (one row per run), ``results.md`` (mean +- std over
seeds); ``accuracy.png`` and ``curves.png`` when all runs are done (or interrupted).
``--probe-epochs`` also probes along training: each run's ``probes`` (epoch, kNN and linear
top-1, the final probes as the last point), early and final numbers in ``results.md`` and
accuracy vs epoch in ``probes.png``.

The models are assembled from lightly's building blocks as lightly's examples do
(``methods.py``); ``--framework solo`` builds solo-learn's BYOL instead, the predictor
chosen by its config key ``method_kwargs.predictor`` (``solo_byol.py``), trained in the
same loop (``training.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .config import CompareConfig
from .frameworks import FRAMEWORKS
from .predictors import PREDICTOR_SPECS, parse_predictor_spec, predictor_spec
from .report import SCHEMA, machine_description, markdown_table, summarize, write_outputs
from .cli import progress_bar
from .training import Job, load_data, run_job

__all__ = ["CompareConfig", "SCHEMA", "compare", "add_arguments", "run"]


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
        worker_cfg = _quiet(cfg)
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


def _quiet(cfg: CompareConfig) -> CompareConfig:
    # Per-epoch bars from several processes would interleave on one terminal.
    from dataclasses import replace

    return replace(cfg, progress=False)


# ----------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits",
                        help="digits (offline, bundled with scikit-learn), fashion-mnist (offline, from its IDX "
                             "files: `apt-get install dataset-fashion-mnist` or a torchvision download), cifar10 "
                             "or stl10")
    parser.add_argument("--data-dir", default="data",
                        help="where the dataset lives: torchvision's root folder (cifar10/stl10; fashion-mnist: "
                             "the IDX files or torchvision's FashionMNIST/raw under it; when absent, "
                             "fashion-mnist falls back to the Debian package's folder)")
    parser.add_argument("--download", action="store_true", help="download cifar10/stl10 if missing")
    parser.add_argument("--method", default="byol", choices=["byol", "simsiam"],
                        help="byol: EMA target network; simsiam: no target, stop-gradient (lightly only)")
    parser.add_argument("--framework", default="lightly", choices=sorted(FRAMEWORKS),
                        help="which SSL framework builds the model (solo: solo-learn's BYOL, installed from "
                             "source, see integrations/solo_learn/README.md)")
    parser.add_argument("--predictors", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
                        help=f"any of {', '.join(PREDICTOR_SPECS)}, each optionally with options, e.g. "
                             f"directpred:eps=0.1,freq=5 (default: {', '.join(FRAMEWORKS['lightly'].default_predictors)}; "
                             f"--framework solo: {', '.join(FRAMEWORKS['solo'].default_predictors)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="one run per predictor and seed; a seed fixes initialisation, batch order and views")
    parser.add_argument("--backbone", default=None,
                        help="small-cnn, fashion-cnn, resnet18 (CIFAR stem), resnet18-imagenet-stem or "
                             "timm:<model> (default per dataset: small-cnn / fashion-cnn / resnet18 / "
                             "resnet18-imagenet-stem); --framework solo: resnet18 (default) or "
                             "resnet18-imagenet-stem, solo-learn's own")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help="default per dataset: digits 60, fashion-mnist 4, cifar10 200, stl10 100")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="default per dataset: 128 / 128 / 256 / 256")
    parser.add_argument("--proj-dim", type=_positive_int, default=None,
                        help="projection width d (default 64 / 128 / 256 / 256)")
    parser.add_argument("--hidden-dim", type=_positive_int, default=None,
                        help="hidden width of the projector and of BYOL's MLP predictor (default 256 / 512 / 4096 "
                             "/ 4096); SimSiam's MLP predictor has hidden width d/4")
    parser.add_argument("--subset", type=_positive_int, default=None,
                        help="train on (and fit the probes to) the first N training images (default: all)")
    parser.add_argument("--test-subset", type=_positive_int, default=None,
                        help="score the probes on the first N test images (default: all)")
    parser.add_argument("--lr", type=float, default=None,
                        help="SGD learning rate for batch 256, scaled linearly with the batch size "
                             "(default per dataset: fashion-mnist 0.3, others 0.06)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--ema-start", type=float, default=None,
                        help="BYOL's target EMA momentum at step 0, cosine-scheduled to 1 "
                             "(default per dataset: fashion-mnist 0.9, others 0.99)")
    parser.add_argument("--knn-k", type=_positive_int, default=20, help="neighbours of the kNN probe")
    parser.add_argument("--probe-epochs", nargs="+", type=_positive_int, default=None, metavar="EPOCH",
                        help="also run the kNN probe after these epochs (e.g. 1 2 4 8), recorded per run with the "
                             "final probes as the last point and drawn in probes.png (default: the probes after the "
                             "last epoch only; each point costs an embedding of the training and test images)")
    parser.add_argument("--probe-linear", action="store_true",
                        help="fit the linear probe at --probe-epochs too (slower on large training sets)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (cifar10/stl10; default min(8, CPUs))")
    parser.add_argument("--jobs", type=_positive_int, default=min(os.cpu_count() or 1, 4),
                        help="runs trained at once, each in its own process (the numbers equal a serial run's); "
                             "default: the CPU count, at most 4. Use 1 on a GPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run; 0 keeps PyTorch's default (1: the default models are too "
                             "small to gain from more, and next to other busy processes OpenMP's spinning "
                             "threads made 2-thread steps 3-35x slower on a 2-core machine)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/compare-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run folder --out: keep its finished runs (same options; --jobs and "
                             "--threads may differ) and train the others")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig(
        dataset=args.dataset, method=args.method, predictors=args.predictors and list(args.predictors),
        seeds=list(args.seeds), framework=args.framework, backbone=args.backbone, epochs=args.epochs,
        batch_size=args.batch_size, proj_dim=args.proj_dim, hidden_dim=args.hidden_dim, subset=args.subset,
        test_subset=args.test_subset, lr=args.lr, weight_decay=args.weight_decay, ema_start=args.ema_start,
        knn_k=args.knn_k, probe_epochs=args.probe_epochs and sorted(set(args.probe_epochs)),
        probe_linear=args.probe_linear, device=args.device, data_dir=args.data_dir, download=args.download,
        workers=args.workers, threads=args.threads, jobs=args.jobs, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    command = "directpred-bench " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    pictures = "accuracy.png, curves.png" + (", probes.png" if cfg.probe_epochs else "")
    print(f"Writing to {out}/ (results.json, .csv, .md after every run; {pictures} at the end)", flush=True)
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out: the run folder to continue")
    results = compare(cfg, out, command, resume=args.resume)
    print(markdown_table(results))
    print(f"Wrote {out}/results.json, results.csv, results.md, {pictures}")
    return results
