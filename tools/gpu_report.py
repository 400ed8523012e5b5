"""Everything a GPU session runs, in one command and one folder: this checkout's CUDA tests and
the timing benchmarks, each part a process under its own time limit, summed up in report.md.

Run it from the repository, with the ``bench`` and ``dev`` extras installed::

    python tools/gpu_report.py --out gpu-report

Every part runs in this checkout, so the tests and the benchmarks import this checkout's
package. ``--dry-run`` runs the same plan on the CPU with tiny sizes (the test suite does, so
the plan cannot rot); ``--only PART ...`` reruns some parts.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
#: The tests with CUDA cases: the head's steady state under ``set_sync_debug_mode("error")``
#: (bf16 autocast and compiled included), the refresh under real TF32, the matmul predictors.
CUDA_TEST_FILES = ["tests/test_head.py", "tests/test_variants_matmul.py", "tests/test_steps.py",
                   "tests/test_refresh.py", "tests/test_sync.py"]


@dataclass
class Part:
    name: str
    limit_s: float
    command: List[str]
    status: str = "not run"
    seconds: float = 0.0
    tail: List[str] = field(default_factory=list)


def _bench(*args: str) -> List[str]:
    return [sys.executable, "-m", "_directpred_bench", *args]


def plan(out: Path, dry_run: bool) -> List[Part]:
    """The parts of the report with their limits (an H100/H200-class GPU), or tiny sizes on the CPU."""
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
             f"--junitxml={out.resolve() / 'tests.xml'}", *CUDA_TEST_FILES]
    if dry_run:
        tiny_step = ["--device", "cpu", "--backbones", "small-cnn", "--byol-dim", "16", "--simsiam-dim", "32",
                     "--hidden", "32", "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "1",
                     "--threads", "1", "--no-progress"]
        return [
            Part("tests", 300, tests),
            Part("speed", 120, _bench("speed", "--device", "cpu", "--dims", "16", "--batch-size", "8", "--calls", "2",
                                      "--rounds", "1", "--threads", "1", "--no-progress", "--predictors", "byol-mlp",
                                      "directpred:refresh=iterative", "--out", str(out / "speed"))),
            Part("step-resnet18", 120, _bench("step", *tiny_step, "--methods", "byol", "--predictors", "mlp",
                                              "directpred", "--profile", "byol:directpred",
                                              "--out", str(out / "step-resnet18"))),
            Part("step-resnet50", 120, _bench("step", *tiny_step, "--methods", "simsiam", "--predictors", "mlp",
                                              "directpred:freq=5", "--out", str(out / "step-resnet50"))),
        ]
    return [
        Part("tests", 170, tests),
        Part("speed", 50, _bench("speed", "--device", "cuda", "--dims", "256", "2048", "--batch-size", "256",
                                 "--calls", "50", "--rounds", "5", "--no-progress", "--predictors", "byol-mlp",
                                 "simsiam-mlp", "floor", "directpred:refresh=exact", "directpred:refresh=iterative",
                                 "directpred:freq=5,refresh=iterative", "directcopy:refresh=iterative",
                                 "--out", str(out / "speed"))),
        Part("step-resnet18", 170, _bench("step", "--device", "cuda", "--backbones", "resnet18-cifar",
                                          "--batch-size", "256", "--compile", "--rounds", "5", "--steps", "5",
                                          "--warmup", "2", "--no-progress", "--profile", "byol:directpred",
                                          "--out", str(out / "step-resnet18"))),
        Part("step-resnet50", 80, _bench("step", "--device", "cuda", "--backbones", "resnet50", "--batch-size", "64",
                                         "--rounds", "3", "--steps", "5", "--warmup", "1", "--no-progress",
                                         "--out", str(out / "step-resnet50"))),
    ]


PARTS = [part.name for part in plan(Path("gpu-report"), dry_run=False)]


def run_part(part: Part, out: Path) -> None:
    start = time.perf_counter()
    try:
        done = subprocess.run(part.command, capture_output=True, text=True, timeout=part.limit_s, cwd=ROOT)
        output = done.stdout + done.stderr
        part.status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as expired:
        captured = expired.stdout or b""
        output = captured.decode() if isinstance(captured, bytes) else captured
        part.status = f"timed out after {part.limit_s:.0f} s"
    (out / f"{part.name}.log").write_text(output)
    part.tail = output.strip().splitlines()[-3:]
    part.seconds = time.perf_counter() - start


def write_report(out: Path, environment: dict, command: str, parts: Sequence[Part]) -> None:
    lines = [f"# GPU report{' (dry run on the CPU)' if environment['dry_run'] else ''}", "", f"`{command}`", "",
             "{device}; torch {torch}; CUDA {cuda}; Python {python}".format(**environment), "",
             "| part | status | seconds |", "|---|---|---:|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} |" for p in parts]
    for p in parts:
        table = out / p.name / ("step.md" if p.name.startswith("step") else "speed.md")
        if table.exists():
            lines += ["", f"## {p.name}", "", table.read_text().strip()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    payload = {"command": command, "environment": environment, "parts": [asdict(p) for p in parts]}
    (out / "report.json").write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> List[Part]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-report"), help="folder for everything")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU with tiny sizes")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, metavar="PART",
                        help=f"run only these parts: {', '.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("gpu_report needs CUDA (torch.cuda.is_available() is False); --dry-run runs the plan on the CPU")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "tools/gpu_report.py", *(sys.argv[1:] if argv is None else argv)])
    environment = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()})",
                   "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
                   "python": platform.python_version(), "dry_run": args.dry_run}
    parts = [part for part in plan(out, args.dry_run) if part.name in args.only]
    for part in parts:
        print(f"[gpu-report] {part.name} (limit {part.limit_s:.0f} s) ...", flush=True)
        run_part(part, out)
        print(f"[gpu-report] {part.name}: {part.status} in {part.seconds:.0f} s", flush=True)
        write_report(out, environment, command, parts)  # after each part: a cut-off run keeps what finished
    return parts


if __name__ == "__main__":
    main()
