"""Per-training-call cost of the DirectPred head next to the MLP predictors it replaces.

What it measures and how is the command's description, ``directpred-bench speed --help``
(``_directpred_bench.SPEED_DESCRIPTION``, written there so that ``--help`` needs no torch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import weakref
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from directpred_plugin import VARIANTS, DirectPredHead

from .predictors import build_predictor, check_predictor, parse_predictor_spec
from .runtime import torch_threads
from .timing import Column, interleaved_medians, markdown_table, optional, seconds_per_item


def _imported_class(spec: str) -> Optional[Callable[..., nn.Module]]:
    """The class named by an import path ``package.module.Class`` (with options after ``:``), else None.

    Lets one run time any predictor class next to ours, e.g. another checkout's head
    (``old.DirectPredHead:freq=5`` with that checkout's package copied as ``old`` on
    ``PYTHONPATH``). The class is built as ``Class(dim, **options)``.
    """
    name, _ = parse_predictor_spec(spec)
    module_name, dot, class_name = name.rpartition(".")
    if not dot:
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--predictors {spec!r}: cannot import {module_name!r} ({error})") from error
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"--predictors {spec!r}: {module_name}.{class_name} is not an nn.Module class")
    return cls


@dataclass
class SpeedRow:
    predictor: str
    dim: int
    batch: int
    device: str
    ms_per_call: float
    parameters: int
    ratio_to_byol_mlp: Optional[float] = None
    ratio_to_simsiam_mlp: Optional[float] = None
    refreshes: Optional[int] = None
    max_error: Optional[float] = None
    fallbacks: Optional[int] = None


def _build(name: str, dim: int, device: torch.device) -> nn.Module:
    imported = _imported_class(name)
    if imported is not None:
        module = imported(dim, **parse_predictor_spec(name)[1])
    else:
        # a head with its name's defaults and calls_per_update: each timed call ends with its own backward
        module = build_predictor(name, dim, None)
    return module.to(device).train()


def _call(module: nn.Module, z: torch.Tensor) -> None:
    out = module(z)
    out.square().mean().backward()
    if module.training and any(True for _ in module.parameters()):
        if isinstance(module, DirectPredHead):
            # a trainable W_p's step ends at the optimizer step (lr 0: W_p changes by its refreshes only)
            if module not in _ZERO_STEPS:
                _ZERO_STEPS[module] = torch.optim.SGD(module.parameters(), lr=0.0)
            _ZERO_STEPS[module].step()
        module.zero_grad(set_to_none=True)


_ZERO_STEPS: "weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer]" = weakref.WeakKeyDictionary()


def refresh_errors(spec: str, dim: int, calls: Sequence[torch.Tensor], device: torch.device) -> Tuple[List[float], int]:
    """Replay ``calls`` on a fresh head; relative error of ``W_p`` after every refresh, and fallbacks."""
    head = _build(spec, dim, device)
    assert isinstance(head, DirectPredHead)
    errors: List[float] = []
    for z in calls:
        before = int(head.num_updates)
        _call(head, z)
        updates = int(head.num_updates)
        if updates != before and updates % head.freq == 0:
            # the reference: the variant's closed form from a float64 eigendecomposition
            reference = VARIANTS[head.variant](head.effective_corr().detach().to(torch.float64), head.eps)
            error = (head.weight.detach().to(torch.float64) - reference).norm() / reference.norm()
            errors.append(float(error))
    return errors, int(head.diagnostics()["exact_refreshes"])


def measure(
    predictors: Sequence[str],
    dims: Sequence[int],
    *,
    batch: int = 256,
    calls: int = 100,
    rounds: int = 5,
    warmup: int = 3,
    device: str = "cpu",
    seed: int = 0,
    errors: bool = True,
    progress: bool = True,
) -> List[SpeedRow]:
    """Median over ``rounds`` of the mean per-call time of blocks of ``calls // rounds`` calls."""
    from .runtime import progress_bar

    dev = torch.device(device)
    torch.manual_seed(seed)
    rows: List[SpeedRow] = []
    per_block = max(calls // rounds, 1)
    bar = progress_bar(total=len(dims) * rounds, desc="speed (dim x round)", disable=not progress)
    for dim in dims:
        bar.set_postfix(dim=dim)
        modules = {name: _build(name, dim, dev) for name in predictors}
        gen = torch.Generator(device="cpu").manual_seed(seed + dim)
        inputs = [
            torch.randn(batch, dim, generator=gen).to(dev).requires_grad_(True) for _ in range(per_block)
        ]
        for module in modules.values():
            seconds_per_item(partial(_call, module), inputs[:warmup], dev)
        last = predictors[-1]
        medians = interleaved_medians(
            {name: partial(seconds_per_item, partial(_call, module), inputs, dev) for name, module in modules.items()},
            rounds=rounds, after_block=lambda name, _: bar.update() if name == last else None)
        for name in predictors:
            row = SpeedRow(
                predictor=name,
                dim=dim,
                batch=batch,
                device=str(dev),
                ms_per_call=medians[name] * 1e3,
                parameters=sum(p.numel() for p in modules[name].parameters()),
            )
            if "byol-mlp" in medians:
                row.ratio_to_byol_mlp = medians[name] / medians["byol-mlp"]
            if "simsiam-mlp" in medians:
                row.ratio_to_simsiam_mlp = medians[name] / medians["simsiam-mlp"]
            module = modules[name]
            # the family's heads (not an imported class): their refreshes are counted and checked
            if isinstance(module, DirectPredHead) and parse_predictor_spec(name)[0] in VARIANTS:
                row.refreshes = int(module.num_updates) // module.freq
                if errors and module.refresh_strategy != "exact":
                    # the same calls in the same order as the timed run, so the same F_hat
                    sequence = inputs[:warmup] + inputs * rounds
                    found, row.fallbacks = refresh_errors(name, dim, sequence, dev)
                    row.max_error = max(found) if found else None
            rows.append(row)
        if progress:
            # beside the bar, on stderr: stdout gets the whole table once, at the end (run)
            bar.write(format_table([r for r in rows if r.dim == dim]), file=sys.stderr)
    bar.close()
    return rows


def _ratio(value: Optional[float]) -> str:
    return optional(value, "{:.2f}x")


COLUMNS: List[Column[SpeedRow]] = [
    Column("predictor", lambda r: r.predictor),
    Column("dim", lambda r: str(r.dim), numeric=True),
    Column("batch", lambda r: str(r.batch), numeric=True),
    Column("device", lambda r: r.device),
    Column("ms / call", lambda r: f"{r.ms_per_call:.2f}", numeric=True),
    Column("params", lambda r: f"{r.parameters:,}", numeric=True),
    Column("vs BYOL MLP", lambda r: _ratio(r.ratio_to_byol_mlp), numeric=True),
    Column("vs SimSiam MLP", lambda r: _ratio(r.ratio_to_simsiam_mlp), numeric=True),
    Column("refreshes", lambda r: optional(r.refreshes), numeric=True),
    Column("max error", lambda r: optional(r.max_error, "{:.1e}"), numeric=True),
    Column("fallbacks", lambda r: optional(r.fallbacks), numeric=True),
]


def format_table(rows: Sequence[SpeedRow]) -> str:
    return markdown_table(COLUMNS, rows)


def run(args: argparse.Namespace) -> List[SpeedRow]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    for spec in args.predictors:
        if _imported_class(spec) is None:
            check_predictor(spec, "speed")  # bad names and values fail before any timing
    with torch_threads(args.threads):
        rows = measure(args.predictors, args.dims, batch=args.batch_size, calls=args.calls,
                       rounds=args.rounds, device=args.device, errors=args.errors, progress=not args.no_progress)
    table = format_table(rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
        (args.out / "speed.md").write_text(table + "\n")
    return rows
