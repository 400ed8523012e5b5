"""Whole training step of BYOL and SimSiam with each predictor: what a user's step costs.

What it measures and how is the command's description, ``directpred-bench step --help``
(``_directpred_bench.STEP_DESCRIPTION``, written there so that ``--help`` needs no torch).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from _directpred_bench import STEP_PREDICTORS
from directpred_plugin import DirectPredHead

from .backbones import BACKBONES
from .methods import LightlyBYOL, LightlySimSiam, Method, MethodConfig
from .predictors import check_predictor
from .runtime import torch_threads
from .timing import Column, interleaved_medians, machine_line, markdown_table, optional, seconds_per_item, synchronize

#: ``--methods`` name -> (model class, projection width, projector hidden width).
METHODS: Dict[str, Tuple[Callable[[MethodConfig], Method], int, int]] = {
    "byol": (LightlyBYOL.from_config, 256, 4096),
    "simsiam": (LightlySimSiam.from_config, 2048, 2048),
}

EMA_MOMENTUM = 0.99


@dataclass
class StepRow:
    backbone: str
    image_size: int
    method: str
    dim: int
    predictor: str
    mode: str  # eager or compiled
    amp: str
    batch: int
    device: str
    ms_per_step: float
    ratio_to_mlp: Optional[float] = None
    peak_mib: Optional[float] = None
    refreshes: Optional[int] = None
    refresh_rejections: Optional[int] = None


@dataclass
class _Config:
    backbone: str
    method: str
    predictor: str
    mode: str
    model: Method
    step: Callable[[Tensor, Tensor], Tensor]  # (x0, x1) -> loss, forward only
    optimizer: torch.optim.Optimizer
    peak: Optional[float] = None

    @property
    def group(self) -> Tuple[str, str, str]:
        return self.backbone, self.method, self.mode


def image_size(backbone: str) -> int:
    size = BACKBONES[backbone].step_image_size
    assert size is not None, f"step does not offer backbone {backbone!r}"
    return size


def build_model(backbone: str, method: str, predictor: str, *, dim: Optional[int] = None,
                hidden: Optional[int] = None) -> Method:
    """The lightly model of ``method`` with ``predictor`` on ``backbone`` (a name step offers)."""
    cls, default_dim, default_hidden = METHODS[method]
    cfg = MethodConfig(backbone=backbone, in_chans=3, image_size=image_size(backbone), num_classes=10,
                       proj_dim=dim or default_dim, hidden_dim=hidden or default_hidden, predictor=predictor)
    return cls(cfg)


def _config(backbone: str, method: str, predictor: str, modes: Sequence[str], device: torch.device, *,
            dims: Dict[str, int], hidden: Dict[str, int], seed: int = 0) -> List[_Config]:
    """One model with its optimizer, and a configuration per mode (eager or compiled) that steps it."""
    torch.manual_seed(seed)  # the same backbone and projector for every predictor
    model = build_model(backbone, method, predictor, dim=dims.get(method), hidden=hidden.get(method)).to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                                weight_decay=1e-5)

    def loss(x0: Tensor, x1: Tensor) -> Tensor:
        return model.training_loss(x0, x1)[0]

    return [_Config(backbone, method, predictor, mode, model, torch.compile(loss) if mode == "compiled" else loss,
                    optimizer) for mode in modes]


def _one_step(config: _Config, x0: Tensor, x1: Tensor, amp: Optional[torch.dtype], device: torch.device) -> None:
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss = config.step(x0, x1)
    config.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    config.optimizer.step()
    config.model.update_target(EMA_MOMENTUM)


def _block(config: _Config, inputs: Sequence[Tuple[Tensor, Tensor]], amp: Optional[torch.dtype],
           device: torch.device) -> float:
    """Seconds per step over ``inputs``; on CUDA, the block's peak memory above what was resident."""
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = seconds_per_item(lambda views: _one_step(config, *views, amp, device), inputs, device)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
        config.peak = peak if config.peak is None else max(config.peak, peak)
    return elapsed


def measure(
    *,
    backbones: Sequence[str],
    methods: Sequence[str],
    predictors: Sequence[str] = STEP_PREDICTORS,
    modes: Sequence[str] = ("eager",),
    batch: int = 32,
    rounds: int = 5,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    amp: Optional[torch.dtype] = None,
    dims: Optional[Dict[str, int]] = None,
    hidden: Optional[Dict[str, int]] = None,
    seed: int = 0,
    progress: bool = True,
) -> List[StepRow]:
    """Median over ``rounds`` of the mean time of ``steps`` steps, configurations interleaved."""
    from .runtime import progress_bar

    dev = torch.device(device)
    dims, hidden = dims or {}, hidden or {}
    if "compiled" in modes:
        # Every configuration's model runs the same code, one recompilation each: past the
        # default limit (8) Dynamo would silently run the rest eagerly.
        limit = 4 * len(backbones) * len(methods) * len(predictors) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
    configs = [config for backbone in backbones for method in methods for predictor in predictors
               for config in _config(backbone, method, predictor, modes, dev, dims=dims, hidden=hidden, seed=seed)]
    gen = torch.Generator().manual_seed(seed)
    inputs: Dict[str, List[Tuple[Tensor, Tensor]]] = {}
    for backbone in backbones:
        size = image_size(backbone)
        inputs[backbone] = [
            (torch.randn(batch, 3, size, size, generator=gen).to(dev),
             torch.randn(batch, 3, size, size, generator=gen).to(dev)) for _ in range(steps)
        ]
    bar = progress_bar(total=(rounds + warmup) * len(configs), desc="step (round x configuration)",
                       disable=not progress)

    def after_block(index: int, warming_up: bool) -> None:
        if warming_up:
            configs[index].peak = None  # the peak of the timed rounds only
        bar.set_postfix_str("warm-up" if warming_up else "timed rounds")
        bar.update()

    # Warm-up rounds interleaved like the timed ones: compilation, and the recompilations a
    # compiled step meets when another configuration's model ran the same code, allocator
    # and pinned buffers, the heads' first refreshes.
    medians = interleaved_medians(
        {index: partial(_block, config, inputs[config.backbone], amp, dev) for index, config in enumerate(configs)},
        rounds=rounds, warmup_rounds=warmup, after_block=after_block)
    bar.close()
    mlp = {c.group: medians[index] for index, c in enumerate(configs) if c.predictor == "mlp"}
    rows = []
    for index, c in enumerate(configs):
        head = c.model.predictor
        refreshes = rejections = None
        if isinstance(head, DirectPredHead):
            refreshes = int(head.num_updates) // head.freq
            rejections = int(head.refresh_rejections)
        rows.append(StepRow(
            backbone=c.backbone, image_size=image_size(c.backbone), method=c.method,
            dim=int(dims.get(c.method) or METHODS[c.method][1]), predictor=c.predictor, mode=c.mode,
            amp="none" if amp is None else str(amp).replace("torch.", ""), batch=batch, device=str(dev),
            ms_per_step=medians[index] * 1e3,
            ratio_to_mlp=medians[index] / mlp[c.group] if c.group in mlp else None,
            peak_mib=c.peak, refreshes=refreshes, refresh_rejections=rejections))
    return rows


COLUMNS: List[Column[StepRow]] = [
    Column("backbone", lambda r: r.backbone),
    Column("image", lambda r: str(r.image_size), numeric=True),
    Column("method", lambda r: r.method),
    Column("dim", lambda r: str(r.dim), numeric=True),
    Column("predictor", lambda r: r.predictor),
    Column("mode", lambda r: r.mode),
    Column("amp", lambda r: r.amp),
    Column("batch", lambda r: str(r.batch), numeric=True),
    Column("ms / step", lambda r: f"{r.ms_per_step:.1f}", numeric=True),
    Column("vs MLP", lambda r: optional(r.ratio_to_mlp, "{:.3f}x"), numeric=True),
    Column("peak MiB", lambda r: optional(r.peak_mib, "{:.0f}", missing="n/a"), numeric=True),
    Column("refreshes", lambda r: optional(r.refreshes), numeric=True),
    Column("rejections", lambda r: optional(r.refresh_rejections), numeric=True),
]


def format_table(rows: Sequence[StepRow]) -> str:
    return markdown_table(COLUMNS, rows)


def profile_step(backbone: str, method: str, predictor: str, *, batch: int, device: str,
                 amp: Optional[torch.dtype], dims: Optional[Dict[str, int]] = None,
                 hidden: Optional[Dict[str, int]] = None, top: int = 20) -> str:
    """``torch.profiler``'s top operators (self time) for one warm step of one configuration."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    (config,) = _config(backbone, method, predictor, ["eager"], dev, dims=dims or {}, hidden=hidden or {})
    size = image_size(backbone)
    x0, x1 = (torch.randn(batch, 3, size, size, device=dev) for _ in range(2))
    for _ in range(3):
        _one_step(config, x0, x1, amp, dev)
    synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _one_step(config, x0, x1, amp, dev)
        synchronize(dev)
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=sort, row_limit=top))


def run(args: argparse.Namespace) -> List[StepRow]:
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    for spec in args.predictors:
        check_predictor(spec, "step")  # bad names and options fail before any model is built
    backbones = args.backbones or (["resnet18-cifar", "resnet50"] if cuda else ["resnet18-cifar"])
    amp_name = args.amp or ("bf16" if cuda else "none")
    amp = torch.bfloat16 if amp_name == "bf16" else None
    dims = {k: v for k, v in {"byol": args.byol_dim, "simsiam": args.simsiam_dim}.items() if v}
    hidden = {m: args.hidden for m in METHODS} if args.hidden else {}
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    with torch_threads(args.threads):
        rows = measure(backbones=backbones, methods=args.methods, predictors=args.predictors, modes=modes,
                       batch=args.batch_size, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                       device=args.device, amp=amp, dims=dims, hidden=hidden, progress=not args.no_progress)
        line = machine_line(torch.device(args.device))
        profile = None
        if args.profile:
            method, _, predictor = args.profile.partition(":")
            profile = profile_step(backbones[0], method, predictor or "directpred", batch=args.batch_size,
                                   device=args.device, amp=amp, dims=dims, hidden=hidden)
    command = shlex.join(["directpred-bench", *getattr(args, "argv", ["step"])])
    table = format_table(rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload: Dict[str, Any] = {"command": command, "machine": line, "rows": [asdict(r) for r in rows]}
        (args.out / "step.json").write_text(json.dumps(payload, indent=2) + "\n")
        text = f"`{command}`\n\n{line}\n\n{table}\n"
        if profile is not None:
            (args.out / "profile.txt").write_text(profile + "\n")
        (args.out / "step.md").write_text(text)
    return rows
