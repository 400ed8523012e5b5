"""The one way the timing benchmarks (``speed``, ``step``) measure: configurations interleaved
round by round after warm-up, the device synchronised around each timed block, the median
per configuration, rows printed as a markdown table and the machine described beside them.

Interleaving makes a slow spell of a shared machine hit every configuration alike, so the
ratios between them hold even where the absolute times drift.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, Hashable, Iterable, List, Mapping, Optional, Sequence, TypeVar

import torch

Item = TypeVar("Item")
Key = TypeVar("Key", bound=Hashable)
Row = TypeVar("Row")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before their kernels end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_item(work: Callable[[Item], None], items: Sequence[Item], device: torch.device) -> float:
    """Mean wall-clock seconds of ``work(item)`` over ``items``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    for item in items:
        work(item)
    synchronize(device)
    return (time.perf_counter() - start) / len(items)


def median(values: Sequence[float]) -> float:
    """The upper median: a measured value, never an average of two."""
    return sorted(values)[len(values) // 2]


def interleaved_medians(blocks: Mapping[Key, Callable[[], float]], *, rounds: int, warmup_rounds: int = 0,
                        after_block: Optional[Callable[[Key, bool], None]] = None) -> Dict[Key, float]:
    """Run every block once per round, in order, ``warmup_rounds`` untimed then ``rounds`` timed;
    each block's median of the seconds it returns.

    ``after_block(key, warming_up)`` runs after each block (a progress bar, resetting a peak).
    """
    samples: Dict[Key, List[float]] = {key: [] for key in blocks}
    for index in range(warmup_rounds + rounds):
        warming_up = index < warmup_rounds
        for key, block in blocks.items():
            seconds = block()
            if not warming_up:
                samples[key].append(seconds)
            if after_block is not None:
                after_block(key, warming_up)
    return {key: median(values) for key, values in samples.items()}


@dataclass(frozen=True)
class Column(Generic[Row]):
    """One column of a markdown table: its header, alignment and how a row's cell is written."""

    header: str
    cell: Callable[[Row], str]
    numeric: bool = False  # right-aligned


def markdown_table(columns: Sequence[Column[Row]], rows: Iterable[Row]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def optional(value: Optional[Any], fmt: str = "{}", missing: str = "") -> str:
    """``fmt`` applied to ``value``, or ``missing`` for None."""
    return missing if value is None else fmt.format(value)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_description(device: torch.device) -> Dict[str, Any]:
    """What ran a benchmark, as the results files record it."""
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": cpu_model(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def machine_line(device: torch.device) -> str:
    """:func:`machine_description` as the one line a table's header carries."""
    info = machine_description(device)
    if "gpu" in info:
        where = f"{info['gpu']}, CUDA {torch.version.cuda}"
    else:
        where = f"{info['processor']}, {info['cpu_count']} logical CPUs"
    return (f"{where}; torch {info['torch']}; {info['torch_threads']} torch threads; "
            f"Python {info['python']}; {platform.system()}")
