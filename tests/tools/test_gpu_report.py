"""``tools/gpu_report.py --dry-run``: the GPU session's plan, run on the CPU so that it cannot rot."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_report  # noqa: E402  (a script of the repository, not a module of the package)


@pytest.mark.slow  # spawns the plan's processes: CI runs it, the fast tier does not
def test_dry_run_runs_every_part_in_the_checkout_and_writes_one_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the parts run in the checkout wherever the command starts
    out = tmp_path / "report"
    parts = gpu_report.main(["--dry-run", "--out", str(out)])
    assert [p.name for p in parts] == ["tests", "speed", "step-resnet18", "step-resnet50"]
    report = json.loads((out / "report.json").read_text())
    assert {p["name"]: p["status"] for p in report["parts"]} == dict.fromkeys(gpu_report.PARTS, "passed")
    assert report["environment"]["dry_run"] and report["environment"]["torch"] == torch.__version__
    assert report["command"] == f"python tools/gpu_report.py --dry-run --out {out}"
    text = (out / "report.md").read_text()
    assert "dry run on the CPU" in text and "## step-resnet18" in text and "## speed" in text
    rows = json.loads((out / "step-resnet18" / "step.json").read_text())["rows"]
    assert [r["predictor"] for r in rows] == ["mlp", "directpred"]
    assert (out / "step-resnet18" / "profile.txt").exists() and (out / "tests.xml").exists()
    assert "passed" in (out / "tests.log").read_text()


def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    def plan(out, dry_run):
        return [gpu_report.Part("tests", 30, [sys.executable, "-c", "print('broken'); raise SystemExit(3)"]),
                gpu_report.Part("speed", 30, [sys.executable, "-c", "print('fine')"])]

    monkeypatch.setattr(gpu_report, "plan", plan)
    gpu_report.main(["--dry-run", "--out", str(tmp_path)])
    parts = json.loads((tmp_path / "report.json").read_text())["parts"]
    assert [(p["name"], p["status"], p["tail"]) for p in parts] == [
        ("tests", "failed (exit 3)", ["broken"]), ("speed", "passed", ["fine"])]


def test_without_cuda_only_the_dry_run_is_allowed(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_report.main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_the_gpu_plan_fits_the_device_limit_and_times_the_gpu():
    parts = {p.name: p for p in gpu_report.plan(Path("gpu-report"), dry_run=False)}
    assert sum(p.limit_s for p in parts.values()) <= 8 * 60
    assert "--compile" in parts["step-resnet18"].command and "cuda" in parts["tests"].command
    assert all("cuda" in p.command for name, p in parts.items() if name != "tests")
    assert all((ROOT / path).is_file() for path in gpu_report.CUDA_TEST_FILES)
