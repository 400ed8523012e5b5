"""``directpred-bench gpu-report --dry-run``: the GPU session's plan, run on the CPU so it cannot rot."""

import json
from pathlib import Path

import pytest
import torch

from directpred_plugin.benchmarks.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # spawns the plan's processes: CI runs it, the fast tier does not
def test_dry_run_runs_every_part_and_writes_one_report(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "docs")  # the tests part runs the checkout that holds the current folder
    out = tmp_path / "report"
    assert main(["gpu-report", "--dry-run", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    parts = {p["name"]: p["status"] for p in report["parts"]}
    assert parts == dict.fromkeys(["tests", "checks", "speed", "step-resnet18", "step-resnet50"], "passed")
    assert report["environment"]["dry_run"] and report["environment"]["torch"] == torch.__version__
    assert report["command"] == f"directpred-bench gpu-report --dry-run --out {out}"
    checks = json.loads((out / "checks.json").read_text())
    assert checks["refresh_rejections"] == 0 and checks["precision_after"] == "high"
    text = (out / "report.md").read_text()
    assert "dry run on the CPU" in text and "## step-resnet18" in text and "## speed" in text
    rows = json.loads((out / "step-resnet18" / "step.json").read_text())["rows"]
    assert [r["predictor"] for r in rows] == ["mlp", "directpred"]
    assert (out / "step-resnet18" / "profile.txt").exists() and (out / "tests.xml").exists()
    assert "passed" in (out / "tests.log").read_text()


@pytest.mark.slow
def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    from directpred_plugin.benchmarks import gpu_report

    monkeypatch.chdir(tmp_path)  # outside a checkout: the plan has no tests part
    original = gpu_report.plan

    def broken(*args):
        parts = [p for p in original(*args) if p.name in ("checks", "speed")]
        parts[0].check = lambda folder: 1 / 0
        return parts

    monkeypatch.setattr(gpu_report, "plan", broken)
    main(["gpu-report", "--dry-run", "--out", str(tmp_path), "--only", "checks", "speed"])
    parts = {p["name"]: p["status"] for p in json.loads((tmp_path / "report.json").read_text())["parts"]}
    assert parts == {"checks": "error", "speed": "passed"}


def test_without_cuda_only_the_dry_run_is_allowed(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--dry-run"):
        main(["gpu-report", "--out", str(tmp_path)])


def test_outside_a_checkout_the_tests_part_is_refused_in_one_line(tmp_path, monkeypatch):
    from directpred_plugin.benchmarks.gpu_report import find_checkout

    assert find_checkout(ROOT / "tests" / "benchmarks") == ROOT and find_checkout(tmp_path) is None
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"CUDA tests .* found none at .* or above it: run it inside a checkout, "
                                         r"give --repo, or leave the tests out with --only$") as refused:
        main(["gpu-report", "--dry-run", "--out", str(tmp_path / "report")])
    assert "\n" not in str(refused.value) and not (tmp_path / "report").exists()
    with pytest.raises(SystemExit, match=f"found none at --repo {tmp_path}"):
        main(["gpu-report", "--dry-run", "--repo", str(tmp_path), "--out", str(tmp_path / "report")])


def test_the_gpu_plan_fits_a_ten_minute_device_limit():
    from directpred_plugin.benchmarks.gpu_report import plan, total_limit

    assert total_limit() <= 8 * 60
    parts = {p.name: p for p in plan(Path("gpu-report"), dry_run=False)}
    assert "--compile" in parts["step-resnet18"].command and "cuda" in parts["tests"].command
    assert all("cuda" in p.command for p in parts.values() if p.command and "step" in p.command)
