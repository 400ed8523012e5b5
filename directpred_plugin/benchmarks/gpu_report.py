"""Everything a GPU session should run, in one command and one folder: a checkout's CUDA tests,
in-process checks and the timing commands, each part under its own time limit.

What it measures and how is the command's description, ``directpred-bench gpu-report --help``
(``_directpred_bench.GPU_REPORT_DESCRIPTION``, written there so that ``--help`` needs no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

#: The checkout's tests that have CUDA cases, relative to its root.
CUDA_TEST_FILES = ["tests/test_head.py", "tests/test_variants_matmul.py", "tests/test_steps.py",
                   "tests/test_refresh.py", "tests/test_sync.py"]


def is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is the root of a checkout: ``pyproject.toml`` beside the CUDA tests."""
    return (folder / "pyproject.toml").is_file() and all((folder / name).is_file() for name in CUDA_TEST_FILES)


def find_checkout(start: Path) -> Optional[Path]:
    """The checkout ``start`` lies in (itself or the nearest folder above it), else None."""
    start = start.resolve()
    return next((folder for folder in (start, *start.parents) if is_checkout(folder)), None)


@dataclass
class Part:
    name: str
    limit_s: float
    command: Optional[List[str]] = None  # a subprocess, or None for an in-process check
    cwd: Optional[Path] = None  # the subprocess's folder (None: the current one)
    check: Optional[Callable[[Path], Dict[str, Any]]] = None
    status: str = "not run"
    seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)


def _bench(*args: str) -> List[str]:
    return [sys.executable, "-m", "directpred_plugin.benchmarks.cli", *args]


def plan(out: Path, dry_run: bool, checkout: Optional[Path] = None) -> List[Part]:
    """The parts of the report, with their limits (GPU) or tiny sizes (dry run); the tests part
    runs in ``checkout``, where ``python -m pytest`` imports the checkout's package."""
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
             f"--junitxml={out.resolve() / 'tests.xml'}", *CUDA_TEST_FILES]
    if dry_run:
        tiny_step = ["--device", "cpu", "--backbones", "small-cnn", "--byol-dim", "16", "--simsiam-dim", "32",
                     "--hidden", "32", "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "1",
                     "--threads", "1", "--no-progress"]
        return [
            Part("tests", 300, tests, cwd=checkout),
            Part("checks", 120, check=lambda folder: checks("cpu", folder, dry_run=True)),
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
        Part("tests", 130, tests, cwd=checkout),
        Part("checks", 40, check=lambda folder: checks("cuda", folder, dry_run=False)),
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


def total_limit(dry_run: bool = False) -> float:
    """Seconds the parts may take together: the report's worst case, before process start-up."""
    return sum(part.limit_s for part in plan(Path("gpu-report"), dry_run))


def checks(device: str, folder: Path, *, dry_run: bool) -> Dict[str, Any]:
    """The in-process checks: no host wait in steady-state steps, and TF32-proof refreshes."""
    from directpred_plugin import VARIANTS
    from directpred_plugin.functional import normalise_statistics
    from directpred_plugin.refresh import iterative_candidate
    from directpred_plugin.variants import RuleOptions

    from .step import EMA_MOMENTUM, build_model

    dev = torch.device(device)
    results: Dict[str, Any] = {}
    torch.manual_seed(0)
    backbone, batch, dims = ("small-cnn", 4, 16) if dry_run else ("resnet18-cifar", 64, None)
    size = 8 if dry_run else 32
    model = build_model(backbone, "byol", "directpred", dim=dims, hidden=dims).to(dev).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    inputs = [(torch.randn(batch, 3, size, size, device=dev), torch.randn(batch, 3, size, size, device=dev))
              for _ in range(8)]

    def one_step(x0: torch.Tensor, x1: torch.Tensor) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model.training_loss(x0, x1)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(EMA_MOMENTUM)

    for x0, x1 in inputs[:3]:
        one_step(x0, x1)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for x0, x1 in inputs[3:]:
            one_step(x0, x1)
        results["steady_state_sync"] = "no host wait in 5 steps" if cuda else "not checked on the CPU (dry run)"
    except RuntimeError as error:
        results["steady_state_sync"] = f"FAILED: {error}"
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    head = model.prediction_head
    results["refreshes"], results["refresh_rejections"] = int(head.num_updates), int(head.refresh_rejections)

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        accepted = {}
        for dim in ((16, 32) if dry_run else (256, 2048)):
            index = torch.arange(1, dim + 1, dtype=torch.float64)
            ok = 0
            for seed in range(5):
                basis = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(seed)))[0]
                stats = ((basis / index) @ basis.T).float().to(dev)  # a power-law spectrum
                _, usable = iterative_candidate(normalise_statistics(stats), VARIANTS["directpred"],
                                                RuleOptions(eps=0.01))
                ok += int(usable)
            accepted[str(dim)] = f"{ok}/5"
        results["tf32_high_accepted"] = accepted
        results["precision_after"] = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(previous)
    failed = str(results["steady_state_sync"]).startswith("FAILED") or results["precision_after"] != "high"
    results["ok"] = not failed and all(v == "5/5" for v in accepted.values())
    (folder / "checks.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def environment(dry_run: bool) -> Dict[str, Any]:
    cuda = torch.cuda.is_available() and not dry_run
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} logical)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "dry_run": dry_run,
    }


def run_part(part: Part, out: Path) -> None:
    start = time.perf_counter()
    try:
        if part.command is not None:
            done = subprocess.run(part.command, capture_output=True, text=True, timeout=part.limit_s, cwd=part.cwd)
            (out / f"{part.name}.log").write_text(done.stdout + done.stderr)
            part.status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
            part.details["tail"] = (done.stdout + done.stderr).strip().splitlines()[-3:]
        else:
            assert part.check is not None
            part.details = part.check(out)
            part.status = "passed" if part.details.get("ok") else "failed"
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        text = output.decode() if isinstance(output, bytes) else output
        (out / f"{part.name}.log").write_text(text)
        part.status = f"timed out after {part.limit_s:.0f} s"
    except Exception:  # a check that breaks must not lose the parts after it
        part.status = "error"
        part.details["traceback"] = traceback.format_exc()
    part.seconds = time.perf_counter() - start


def write_report(out: Path, env: Dict[str, Any], command: str, parts: List[Part]) -> None:
    lines = [f"# GPU report{' (dry run on the CPU)' if env['dry_run'] else ''}", "",
             f"`{command}`", "",
             f"{env['device']}; torch {env['torch']}; CUDA {env['cuda']}; Python {env['python']}", "",
             "| part | status | seconds |", "|---|---|---:|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} |" for p in parts]
    for p in parts:
        table = out / p.name / ("step.md" if p.name.startswith("step") else "speed.md")
        if table.exists():
            lines += ["", f"## {p.name}", "", table.read_text().strip()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    payload = {"command": command, "environment": env,
               "parts": [{k: v for k, v in asdict(p).items() if k not in ("command", "check")} for p in parts]}
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def run(args: argparse.Namespace) -> List[Part]:
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu-report needs CUDA (torch.cuda.is_available() is False); --dry-run runs the plan on the CPU")
    wanted = args.only or [part.name for part in plan(args.out, args.dry_run)]
    checkout = None
    if "tests" in wanted:
        checkout = args.repo or find_checkout(Path.cwd())
        if checkout is None or not is_checkout(checkout):
            where = f"--repo {checkout}" if checkout is not None else f"{Path.cwd()} or above it"
            raise SystemExit(f"gpu-report runs a checkout's CUDA tests ({CUDA_TEST_FILES[0]} and the others beside "
                             f"pyproject.toml), found none at {where}: run it inside a checkout, give --repo, or "
                             "leave the tests out with --only")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["directpred-bench", *getattr(args, "argv", ["gpu-report"])])
    env = environment(args.dry_run)
    parts = [p for p in plan(out, args.dry_run, checkout) if p.name in wanted]
    for part in parts:
        print(f"[gpu-report] {part.name} (limit {part.limit_s:.0f} s) ...", flush=True)
        run_part(part, out)
        print(f"[gpu-report] {part.name}: {part.status} in {part.seconds:.0f} s", flush=True)
        write_report(out, env, command, parts)  # after each part: a cut-off run keeps what finished
    return parts
