"""Side-by-side BYOL training with each predictor: accuracy, collapse, alignment, cost.

Every run trains the same BYOL model (online backbone + projector + predictor, EMA target,
stop-gradient, symmetrised negative cosine loss on two augmented views) and changes only
the predictor. Defaults run offline on a laptop CPU: scikit-learn's handwritten digits,
a small CNN, 6 predictors x 3 seeds. ``--dataset cifar10|stl10`` with ``--device cuda``
scales the same comparison up.

Outputs, in ``--out`` (default ``runs/compare-<time>``): ``results.json`` (configuration,
machine, every run with its training curves, per-predictor summary), ``results.csv`` (one
row per run), ``results.md`` (mean +- std over seeds) and ``accuracy.png`` / ``curves.png``.

The model is assembled from lightly's building blocks exactly as lightly's
``examples/pytorch/byol.py`` does, with the prediction head swapped per run; training is
a plain PyTorch loop like that example's (a Lightning ``Trainer`` adds per-step overhead
that dominates ~10 ms CPU steps, and nothing here needs its callbacks or loggers).
``--framework solo`` builds solo-learn's BYOL instead, the predictor chosen by its config
key ``method_kwargs.predictor`` (see ``solo_byol.py``), and trains it in the same loop.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from directpred_plugin.functional import collapse_indicator, eigenspace_alignment

SCHEMA = "directpred-bench/compare/1"


# ----------------------------------------------------------------------- predictors
@dataclass(frozen=True)
class PredictorSpec:
    """How to build one predictor for projections of width ``dim`` (``hidden`` for MLPs)."""

    build: Callable[[int, int], nn.Module]
    summary: str
    #: The predictor's ``W_p`` when it is one matrix (for the eigenspace alignment), else None.
    matrix: Optional[Callable[[nn.Module], Tensor]] = None
    #: The ``method_kwargs`` that select this predictor in a solo-learn config (read by
    #: ``directpred_plugin.solo``); None when solo-learn's config cannot express it.
    solo_kwargs: Optional[Dict[str, Any]] = None


def _mlp(dim: int, hidden: int) -> nn.Module:
    from lightly.models.modules.heads import BYOLPredictionHead

    return BYOLPredictionHead(dim, hidden, dim)


def _linear(dim: int, hidden: int) -> nn.Module:
    return nn.Linear(dim, dim, bias=False)


def _weight(module: nn.Module) -> Tensor:
    return module.weight


def _directpred(summary: str, **options: Any) -> PredictorSpec:
    def build(dim: int, hidden: int) -> nn.Module:
        from directpred_plugin.lightly import DirectPredPredictionHead

        # The BYOL loop calls the predictor once per view; calls_per_update=2 pools both
        # views into one update per iteration, the paper's rule, with freq counting iterations.
        return DirectPredPredictionHead(dim, calls_per_update=2, **options)

    # solo-learn: the plugin pools the views of a training step the same way by default.
    return PredictorSpec(build, summary, _weight, {"predictor": "directpred", "directpred": dict(options)})


PREDICTORS: Dict[str, PredictorSpec] = {
    "mlp": PredictorSpec(_mlp, "BYOL MLP d-h-d with BatchNorm+ReLU, trained by SGD",
                         solo_kwargs={"predictor": "mlp"}),  # solo-learn's own MLP
    "linear": PredictorSpec(_linear, "linear d x d (no bias), trained by SGD", _weight),
    "directpred": _directpred("DirectPred, freq 1 (closed form)"),
    "directpred-hybrid": _directpred("DirectPred every 5 iterations, SGD-trained in between", freq=5, trainable=True),
    "directcopy": _directpred("DirectCopy, freq 1 (closed form)", variant="directcopy"),
    "none": PredictorSpec(lambda dim, hidden: nn.Identity(), "no predictor (identity)"),
}


# ----------------------------------------------------------------------- frameworks
@dataclass
class MethodConfig:
    """What a framework needs to build one BYOL model (it builds the backbone itself)."""

    backbone: str  # a --backbone name
    in_chans: int
    image_size: int
    num_classes: int
    proj_dim: int
    hidden_dim: int
    predictor: str


class LightlyBYOL(nn.Module):
    """BYOL from lightly's building blocks (``BYOLProjectionHead``, ``NegativeCosineSimilarity``,
    ``update_momentum``), the prediction head taken from :data:`PREDICTORS`.

    Interface used by the benchmark loop (a framework entry returns an object providing it):
    ``training_loss(x0, x1) -> (loss, online projections of x0)``, ``update_target(momentum)``,
    ``encode(x)`` (backbone features), ``project(x)`` (online projections) and ``predictor``.
    """

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        from .backbones import build_backbone

        self.backbone, feature_dim = build_backbone(cfg.backbone, cfg.in_chans, cfg.image_size)
        self.projection_head = BYOLProjectionHead(feature_dim, cfg.hidden_dim, cfg.proj_dim)
        self.prediction_head = PREDICTORS[cfg.predictor].build(cfg.proj_dim, cfg.hidden_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    @property
    def predictor(self) -> nn.Module:
        return self.prediction_head

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(start_dim=1)

    def project(self, x: Tensor) -> Tensor:
        return self.projection_head(self.encode(x))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        z = self.project(x)
        return self.prediction_head(z), z

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def training_loss(self, x0: Tensor, x1: Tensor) -> Tuple[Tensor, Tensor]:
        p0, z0 = self(x0)
        p1, _ = self(x1)
        loss = 0.5 * (self.criterion(p0, self.forward_momentum(x1)) + self.criterion(p1, self.forward_momentum(x0)))
        return loss, z0

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)


def _solo_byol(cfg: MethodConfig) -> nn.Module:
    from .solo_byol import SoloBYOL

    return SoloBYOL(cfg)


def _require_solo() -> None:
    from .solo_byol import require_solo

    require_solo()


@dataclass(frozen=True)
class Framework:
    """One ``--framework`` choice: how it builds the BYOL model and what it can express."""

    build: Callable[[MethodConfig], nn.Module]
    #: The :data:`PREDICTORS` it can build.
    predictors: Tuple[str, ...]
    #: The ``--backbone`` names it can build, the first being its default where the dataset's
    #: default is not among them; None: every name ``backbones.build_backbone`` knows.
    backbones: Optional[Tuple[str, ...]] = None
    #: Raises ImportError, naming how to install the framework, when it is missing.
    require: Callable[[], None] = lambda: None

    def default_backbone(self, dataset_default: str) -> str:
        if self.backbones is None or dataset_default in self.backbones:
            return dataset_default
        return self.backbones[0]


#: Framework name -> how it builds a model with the LightlyBYOL interface.
FRAMEWORKS: Dict[str, Framework] = {
    "lightly": Framework(LightlyBYOL, tuple(PREDICTORS)),
    # solo-learn's own BYOL, the predictor chosen through its YAML key (benchmarks/solo_byol.py).
    "solo": Framework(
        _solo_byol,
        tuple(name for name, spec in PREDICTORS.items() if spec.solo_kwargs is not None),
        backbones=("resnet18", "resnet18-imagenet-stem"),
        require=_require_solo,
    ),
}


# --------------------------------------------------------------------------- config
@dataclass
class CompareConfig:
    dataset: str = "digits"
    predictors: Optional[List[str]] = None  # None: every predictor the framework builds
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    framework: str = "lightly"
    backbone: Optional[str] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    proj_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    lr: float = 0.06  # for batch 256, scaled linearly with the batch size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    ema_start: float = 0.99
    knn_k: int = 20
    device: str = "cpu"
    data_dir: str = "data"
    download: bool = False
    workers: Optional[int] = None
    threads: int = 1
    progress: bool = True

    def resolve(self, defaults: Any) -> "CompareConfig":
        """Fill the options left as None from the dataset's defaults."""
        cfg = copy.copy(self)
        for name in ("epochs", "batch_size", "proj_dim", "hidden_dim"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(defaults, name))
        framework = FRAMEWORKS[cfg.framework]
        if cfg.predictors is None:
            cfg.predictors = list(framework.predictors)
        if cfg.backbone is None:
            cfg.backbone = framework.default_backbone(defaults.backbone)
        return cfg

    def validate(self) -> None:
        unknown = [p for p in self.predictors or () if p not in PREDICTORS]
        if unknown:
            raise ValueError(f"unknown predictor(s) {unknown}; expected some of {list(PREDICTORS)}")
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"--framework must be one of {sorted(FRAMEWORKS)}, got {self.framework!r}")
        framework = FRAMEWORKS[self.framework]
        inexpressible = [p for p in self.predictors or () if p not in framework.predictors]
        if inexpressible:
            raise ValueError(
                f"--framework {self.framework} cannot build predictor(s) {inexpressible}; "
                f"it supports {list(framework.predictors)}"
            )
        if self.backbone is not None and framework.backbones is not None and self.backbone not in framework.backbones:
            raise ValueError(
                f"--framework {self.framework} builds --backbone {' or '.join(framework.backbones)}, "
                f"got {self.backbone!r}"
            )
        if not self.seeds:
            raise ValueError("--seeds needs at least one integer seed")
        for name in ("epochs", "batch_size", "proj_dim", "hidden_dim", "knn_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
        framework.require()


# ------------------------------------------------------------------------- running
def machine_description(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": _cpu_model(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_memory_mib(device: torch.device) -> Tuple[float, str]:
    """Peak memory and what it measures (CUDA: this run's allocations; CPU: the process's max RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return float("nan"), "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10, "cpu_process_max_rss"


def _count(tensors) -> int:
    return int(sum(t.numel() for t in tensors))


def build_method(cfg: CompareConfig, data: Any, predictor: str, seed: int) -> nn.Module:
    # Same seed -> same backbone and projector initialisation for every predictor (both
    # frameworks build the predictor last).
    torch.manual_seed(seed)
    method_cfg = MethodConfig(cfg.backbone, data.channels, data.image_size, data.num_classes, cfg.proj_dim,
                              cfg.hidden_dim, predictor)
    return FRAMEWORKS[cfg.framework].build(method_cfg)


def evaluate(method: nn.Module, data: Any, cfg: CompareConfig, device: torch.device,
             matrix: Optional[Callable[[nn.Module], Tensor]]) -> Dict[str, Optional[float]]:
    from .probes import embed, knn_top1, linear_probe_top1

    batch = max(cfg.batch_size, 256)
    train_x, train_y = embed([method], data.labelled("train", batch, device), method.encode)
    test_x, test_y = embed([method], data.labelled("test", batch, device), method.encode)
    test_z, _ = embed([method], data.labelled("test", batch, device), method.project)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on collapsed features
        metrics: Dict[str, Optional[float]] = {
            "knn_top1": knn_top1(train_x, train_y, test_x, test_y, k=cfg.knn_k),
            "linear_top1": linear_probe_top1(train_x, train_y, test_x, test_y),
        }
    metrics["collapse"] = float(collapse_indicator(torch.from_numpy(test_z)))
    metrics["alignment"] = None
    if matrix is not None:
        train_z, _ = embed([method], data.labelled("train", batch, device), method.project)
        z = torch.from_numpy(train_z).double()
        corr = z.T @ z / len(z)  # correlation of the predictor's input (clean training images)
        value = float(eigenspace_alignment(matrix(method.predictor).detach().cpu(), corr))
        metrics["alignment"] = value if math.isfinite(value) else None
    return metrics


def train_one(cfg: CompareConfig, data: Any, predictor: str, seed: int, device: torch.device,
              position: int = 1) -> Dict[str, Any]:
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule
    from tqdm.auto import tqdm

    method = build_method(cfg, data, predictor, seed).to(device)
    method.train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    base_lr = cfg.lr * cfg.batch_size / 256
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set")
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_fraction * total)
    generator = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    history: Dict[str, List[float]] = {"epoch": [], "loss": [], "collapse": []}
    step = 0
    seconds = 0.0
    bar = tqdm(range(cfg.epochs), desc=f"{predictor} seed {seed}", position=position, leave=False,
               disable=not cfg.progress, dynamic_ncols=True)
    for epoch in bar:
        losses, collapses = [], []
        start = time.perf_counter()
        for x0, x1 in data.views(cfg.batch_size, generator, device):
            for group in optimizer.param_groups:
                group["lr"] = cosine_warmup_schedule(step, total, base_lr, 0.0, warmup, 0.0)
            method.update_target(cosine_schedule(step, total, cfg.ema_start, 1.0))
            loss, z0 = method.training_loss(x0, x1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            collapses.append(collapse_indicator(z0))
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        history["epoch"].append(epoch + 1)
        history["loss"].append(float(torch.stack(losses).mean()))
        history["collapse"].append(float(torch.stack(collapses).mean()))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", collapse=f"{history['collapse'][-1]:.3f}")
    bar.close()

    spec = PREDICTORS[predictor]
    metrics = evaluate(method, data, cfg, device, spec.matrix)
    memory, memory_kind = peak_memory_mib(device)
    return {
        "predictor": predictor,
        "seed": seed,
        **metrics,
        "steps": step,
        "train_seconds": seconds,
        "ms_per_step": 1e3 * seconds / max(step, 1),
        "peak_memory_mib": memory,
        "memory_kind": memory_kind,
        "predictor_params": _count(method.predictor.parameters()),
        "predictor_buffers": _count(method.predictor.buffers()),
        "history": history,
    }


def untrained_baseline(cfg: CompareConfig, data: Any, seed: int, device: torch.device) -> Dict[str, Any]:
    """The probes on the randomly initialised backbone every run of this seed starts from."""
    method = build_method(cfg, data, cfg.predictors[0], seed).to(device)
    metrics = evaluate(method, data, cfg, device, None)
    return {"seed": seed, "knn_top1": metrics["knn_top1"], "linear_top1": metrics["linear_top1"]}


def summarize(runs: Sequence[Dict[str, Any]], predictors: Sequence[str]) -> List[Dict[str, Any]]:
    metrics = ("knn_top1", "linear_top1", "collapse", "alignment", "ms_per_step", "peak_memory_mib")
    rows = []
    for name in predictors:
        mine = [r for r in runs if r["predictor"] == name]
        if not mine:
            continue
        row: Dict[str, Any] = {"predictor": name, "seeds": len(mine), "predictor_params": mine[0]["predictor_params"]}
        for key in metrics:
            values = [r[key] for r in mine if r[key] is not None and math.isfinite(r[key])]
            row[f"{key}_mean"] = float(np.mean(values)) if values else None
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        rows.append(row)
    return rows


def compare(cfg: CompareConfig, out: Optional[Path] = None) -> Dict[str, Any]:
    """Train every predictor x seed, evaluate, and write the run folder (when ``out`` is given)."""
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _compare(cfg, out)
    finally:
        torch.set_num_threads(threads)


def _compare(cfg: CompareConfig, out: Optional[Path]) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    from .data import build_dataset

    device = torch.device(cfg.device)
    data = build_dataset(cfg.dataset, data_dir=Path(cfg.data_dir), download=cfg.download, workers=cfg.workers)
    cfg = cfg.resolve(data.defaults)
    cfg.validate()
    machine = machine_description(device)
    started = time.perf_counter()

    runs: List[Dict[str, Any]] = []
    baselines: List[Dict[str, Any]] = []
    jobs = [(seed, name) for seed in cfg.seeds for name in cfg.predictors]
    bar = tqdm(jobs, desc="compare", position=0, disable=not cfg.progress, dynamic_ncols=True)
    for seed, name in bar:
        if not any(b["seed"] == seed for b in baselines):
            baselines.append(untrained_baseline(cfg, data, seed, device))
        bar.set_postfix(predictor=name, seed=seed)
        run = train_one(cfg, data, name, seed, device)
        runs.append(run)
        bar.write(f"{name:>18} seed {seed}: kNN {100 * run['knn_top1']:.1f}%  linear {100 * run['linear_top1']:.1f}%"
                  f"  collapse {run['collapse']:.4f}  {run['ms_per_step']:.1f} ms/step")
    bar.close()

    if hasattr(os, "getloadavg"):
        machine["load_average_1_5_15min_at_end"] = [round(v, 2) for v in os.getloadavg()]
    machine["total_seconds"] = round(time.perf_counter() - started, 1)
    results = {
        "schema": SCHEMA,
        "created": datetime.now().isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "predictor_descriptions": {name: PREDICTORS[name].summary for name in cfg.predictors},
        "collapse_isotropic_max": 1 / math.sqrt(cfg.proj_dim),
        "machine": machine,
        "runs": runs,
        "untrained": baselines,
        "summary": summarize(runs, cfg.predictors),
    }
    if out is not None:
        write_outputs(results, Path(out))
    return results


# ------------------------------------------------------------------------- outputs
CSV_COLUMNS = [
    "predictor", "seed", "knn_top1", "linear_top1", "collapse", "alignment", "steps", "train_seconds",
    "ms_per_step", "peak_memory_mib", "memory_kind", "predictor_params", "predictor_buffers",
]


def _fmt(mean: Optional[float], std: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
    if mean is None:
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def markdown_table(results: Dict[str, Any]) -> str:
    cfg = results["config"]
    machine = results["machine"]
    memory_kind = results["runs"][0]["memory_kind"] if results["runs"] else ""
    lines = [
        f"BYOL on `{cfg['dataset']}` with a `{cfg['backbone']}` backbone via `{cfg['framework']}`, "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, projection dim {cfg['proj_dim']} "
        f"(hidden {cfg['hidden_dim']}); mean ± std over seeds {cfg['seeds']}.",
        "",
        "| predictor | kNN top-1 (%) | linear top-1 (%) | collapse | alignment | ms / step | peak mem (MiB) "
        "| predictor params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["summary"]:
        lines.append(
            f"| {row['predictor']} | {_fmt(row['knn_top1_mean'], row['knn_top1_std'], 100)} "
            f"| {_fmt(row['linear_top1_mean'], row['linear_top1_std'], 100)} "
            f"| {_fmt(row['collapse_mean'], row['collapse_std'], digits=4)} "
            f"| {_fmt(row['alignment_mean'], row['alignment_std'], digits=3)} "
            f"| {_fmt(row['ms_per_step_mean'], row['ms_per_step_std'])} "
            f"| {_fmt(row['peak_memory_mib_mean'], None, digits=0)} | {row['predictor_params']:,} |"
        )
    base = results["untrained"]
    if base:
        def stats(key: str) -> Tuple[float, Optional[float]]:
            values = [b[key] for b in base]
            return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)

        # No collapse value: an untrained projector's BatchNorm running statistics are still
        # the initial ones, so its eval-mode projections say nothing about collapse.
        lines.append(
            f"| *untrained backbone* | {_fmt(*stats('knn_top1'), 100)} | {_fmt(*stats('linear_top1'), 100)} "
            "| – | – | – | – | – |"
        )
    lines += [
        "",
        f"collapse: mean std of the l2-normalised projections of the test images (isotropic maximum "
        f"1/sqrt({cfg['proj_dim']}) = {results['collapse_isotropic_max']:.4f}, 0 = complete collapse). "
        "alignment: eigenspace alignment of the final `W_p` with the correlation of the projections of the "
        "training images (linear predictors only). ms / step: wall time of a training step including "
        f"augmentation. peak mem: {memory_kind.replace('_', ' ')}"
        + (" (cumulative over the runs of one process)" if memory_kind == "cpu_process_max_rss" else "") + ".",
        "",
        f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')} "
        f"({machine.get('torch_threads')} threads), device {machine.get('device')}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + (f"; load average {machine['load_average_1_5_15min_at_start']} at start, "
           f"{machine.get('load_average_1_5_15min_at_end')} at end"
           if "load_average_1_5_15min_at_start" in machine else "")
        + f"; total {machine.get('total_seconds')} s.",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(results: Dict[str, Any], out: Path) -> None:
    from .plots import plot_accuracy, plot_curves

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for run in results["runs"]:
            writer.writerow(run)
    (out / "results.md").write_text(markdown_table(results))
    plot_accuracy(results, out / "accuracy.png")
    plot_curves(results, out / "curves.png")


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", help="digits (offline, default), cifar10 or stl10")
    parser.add_argument("--data-dir", default="data", help="where torchvision datasets live (cifar10/stl10)")
    parser.add_argument("--download", action="store_true", help="download cifar10/stl10 if missing")
    parser.add_argument("--framework", default="lightly", choices=sorted(FRAMEWORKS),
                        help="which SSL framework builds the BYOL model (solo: solo-learn's BYOL, installed "
                             "from source, see integrations/solo_learn/README.md)")
    parser.add_argument("--predictors", nargs="+", default=None, metavar="NAME",
                        help=f"any of {', '.join(PREDICTORS)} (default: all that --framework builds; "
                             f"solo: {', '.join(FRAMEWORKS['solo'].predictors)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--backbone", default=None,
                        help="small-cnn, resnet18 (CIFAR stem), resnet18-imagenet-stem or timm:<model> "
                             "(default per dataset: small-cnn / resnet18 / resnet18-imagenet-stem); "
                             "--framework solo: resnet18 (default) or resnet18-imagenet-stem, solo-learn's own")
    parser.add_argument("--epochs", type=int, default=None, help="default per dataset: 60 / 200 / 100")
    parser.add_argument("--batch-size", type=int, default=None, help="default per dataset: 128 / 256 / 256")
    parser.add_argument("--proj-dim", type=int, default=None, help="projection width d (default 64 / 256 / 256)")
    parser.add_argument("--hidden-dim", type=int, default=None,
                        help="hidden width of the projector and MLP predictor (default 256 / 4096 / 4096)")
    parser.add_argument("--lr", type=float, default=0.06, help="SGD learning rate for batch 256 (scaled linearly)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--ema-start", type=float, default=0.99,
                        help="target EMA momentum at step 0, cosine-scheduled to 1")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (cifar10/stl10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 0 keeps PyTorch's default (default 1: the default model is "
                             "too small to gain from more, and next to other busy processes OpenMP's spinning "
                             "threads made 2-thread steps 3-35x slower on a 2-core machine)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/compare-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig(
        dataset=args.dataset, predictors=args.predictors and list(args.predictors), seeds=list(args.seeds),
        framework=args.framework,
        backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, proj_dim=args.proj_dim,
        hidden_dim=args.hidden_dim, lr=args.lr, weight_decay=args.weight_decay, ema_start=args.ema_start,
        knn_k=args.knn_k, device=args.device, data_dir=args.data_dir, download=args.download,
        workers=args.workers, threads=args.threads, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    results = compare(cfg, out)
    print(markdown_table(results))
    print(f"Wrote {out}/results.json, results.csv, results.md, accuracy.png, curves.png")
    return results
