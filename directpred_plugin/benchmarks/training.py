"""``compare``'s training loop: one model, one predictor, one seed; and the untrained baseline.

A plain PyTorch loop like lightly's examples (a Lightning ``Trainer`` adds per-step overhead
that dominates small CPU steps, and nothing here needs its callbacks or loggers). Every job
depends only on the configuration, its predictor and its seed, so jobs can run in any
order or in separate processes and give the same numbers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from directpred_plugin.functional import collapse_indicator

from .data import Dataset
from .methods import Method, MethodConfig
from .runtime import progress_bar
from .config import CompareConfig
from .evaluation import evaluate, probe_accuracy, projection_rank
from .frameworks import FRAMEWORKS
from .predictors import predictor_spec

#: One unit of work: ``(predictor spec, seed)``; predictor None is the untrained baseline.
Job = Tuple[Optional[str], int]

_DATA_CACHE: Dict[Tuple[Any, ...], Any] = {}


def load_data(cfg: CompareConfig) -> Any:
    """The dataset of ``cfg``, loaded once per process."""
    from .data import DATASETS, build_dataset

    key = (DATASETS.get(cfg.dataset), cfg.dataset, cfg.data_dir, cfg.download, cfg.workers, cfg.subset,
           cfg.test_subset)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = build_dataset(cfg.dataset, data_dir=Path(cfg.data_dir), download=cfg.download,
                                         workers=cfg.workers, subset=cfg.subset, test_subset=cfg.test_subset)
    return _DATA_CACHE[key]


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


def build_method(cfg: CompareConfig, data: Dataset, predictor: str, seed: int) -> Method:
    # Same seed -> same backbone and projector initialisation for every predictor (every
    # method builds the predictor last).
    torch.manual_seed(seed)
    method_cfg = MethodConfig(cfg.backbone, data.channels, data.image_size, data.num_classes, cfg.proj_dim,
                              cfg.hidden_dim, predictor)
    return FRAMEWORKS[cfg.framework].methods[cfg.method](method_cfg)


def train_one(cfg: CompareConfig, data: Dataset, predictor: str, seed: int, device: torch.device,
              position: int = 1) -> Dict[str, Any]:
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

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

    history: Dict[str, List[float]] = {"epoch": [], "loss": [], "collapse": [], "effective_rank": []}
    probe_epochs = set(cfg.probe_epochs or ())
    probes: Dict[str, List[Optional[float]]] = {"epoch": [], "knn_top1": [], "linear_top1": []}
    step = 0
    seconds = 0.0
    bar = progress_bar(range(cfg.epochs), desc=f"{predictor} seed {seed}", position=position, leave=False,
                       disable=not cfg.progress)
    for epoch in bar:
        losses, collapses, projections = [], [], []
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
            projections.append(z0.detach())
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        history["epoch"].append(epoch + 1)
        history["loss"].append(float(torch.stack(losses).mean()))
        history["collapse"].append(float(torch.stack(collapses).mean()))
        # Over the whole epoch's online projections, outside the timed steps.
        history["effective_rank"].append(projection_rank(torch.cat(projections)))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", rank=f"{history['effective_rank'][-1]:.1f}")
        if epoch + 1 in probe_epochs and epoch + 1 < cfg.epochs:
            # Forked RNG: a DataLoader draws its seed from the global generator, and the probes
            # must leave the training (its numbers, its timing) as it is without them.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                point = probe_accuracy(method, data, cfg.batch_size, cfg.knn_k, device, linear=cfg.probe_linear)
            _append_probe(probes, epoch + 1, point)
    bar.close()

    metrics = evaluate(method, data, cfg.batch_size, cfg.knn_k, device, predictor_spec(predictor).matrix)
    if probe_epochs:
        # The final evaluation is the last point: the same probes on the same model.
        _append_probe(probes, cfg.epochs, metrics)
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
        **({"probes": probes} if probe_epochs else {}),
    }


def _append_probe(probes: Dict[str, List[Optional[float]]], epoch: int, point: Dict[str, Optional[float]]) -> None:
    probes["epoch"].append(epoch)
    probes["knn_top1"].append(point["knn_top1"])
    probes["linear_top1"].append(point["linear_top1"])


def untrained_baseline(cfg: CompareConfig, data: Dataset, seed: int, device: torch.device) -> Dict[str, Any]:
    """The probes on the randomly initialised backbone every run of this seed starts from."""
    method = build_method(cfg, data, cfg.predictors[0], seed).to(device)
    metrics = evaluate(method, data, cfg.batch_size, cfg.knn_k, device, None)
    return {"seed": seed, "knn_top1": metrics["knn_top1"], "linear_top1": metrics["linear_top1"]}


def run_job(cfg: CompareConfig, job: Job, position: int = 1) -> Dict[str, Any]:
    """One training (or the untrained baseline when the job's predictor is None), timed end to end."""
    from .runtime import torch_threads

    predictor, seed = job
    start = time.perf_counter()
    with torch_threads(cfg.threads):
        data = load_data(cfg)
        device = torch.device(cfg.device)
        if predictor is None:
            result = untrained_baseline(cfg, data, seed, device)
        else:
            result = train_one(cfg, data, predictor, seed, device, position)
    result["job_seconds"] = time.perf_counter() - start
    return result
