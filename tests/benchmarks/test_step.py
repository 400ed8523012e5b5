"""Smoke test of ``directpred-bench step``: every configuration timed, ratios to the MLP of its group."""

import json
import math

import pytest
import torch

from _directpred_bench import main

TINY = ["--backbones", "small-cnn", "--byol-dim", "16", "--simsiam-dim", "32", "--hidden", "32",
        "--batch-size", "4", "--rounds", "2", "--steps", "2", "--warmup", "1", "--threads", "1", "--no-progress"]


def test_step_times_every_configuration_against_the_mlp(tmp_path):
    predictors = ["mlp", "directpred", "directpred:freq=5", "directcopy"]
    argv = ["step", *TINY, "--predictors", *predictors, "--profile", "byol:directpred", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "step.json").read_text())
    assert payload["command"].startswith("directpred-bench step --backbones small-cnn")
    assert "torch " + torch.__version__ in payload["machine"]
    rows = payload["rows"]
    assert [(r["method"], r["predictor"]) for r in rows] == [(m, p) for m in ("byol", "simsiam") for p in predictors]
    mlp = {r["method"]: r["ms_per_step"] for r in rows if r["predictor"] == "mlp"}
    for r in rows:
        assert math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0
        assert r["ratio_to_mlp"] == pytest.approx(r["ms_per_step"] / mlp[r["method"]])
        assert r["dim"] == {"byol": 16, "simsiam": 32}[r["method"]] and r["mode"] == "eager"
        assert r["peak_mib"] is None and r["amp"] == "none"  # CPU: no allocator statistics, no autocast
    by_name = {(r["method"], r["predictor"]): r for r in rows}
    # 1 warm-up round + 2 timed rounds of 2 steps: 6 steps, each folded by its backward pass
    assert by_name["byol", "directpred"]["refreshes"] == 6 and by_name["byol", "directpred:freq=5"]["refreshes"] == 1
    assert by_name["simsiam", "mlp"]["refreshes"] is None
    assert all(r["refresh_rejections"] in (None, 0) for r in rows)
    table = (tmp_path / "step.md").read_text()
    assert table.count("| small-cnn |") == len(rows) and payload["command"] in table
    assert "aten::" in (tmp_path / "profile.txt").read_text()


def test_step_compiled_rows_are_their_own_group(tmp_path):
    argv = ["step", *TINY, "--methods", "byol", "--predictors", "mlp", "directpred", "--compile",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [(r["predictor"], r["mode"]) for r in rows] == [
        ("mlp", "eager"), ("mlp", "compiled"), ("directpred", "eager"), ("directpred", "compiled")]
    assert [r["ratio_to_mlp"] for r in rows if r["predictor"] == "mlp"] == [1.0, 1.0]
    torch._dynamo.reset()


def test_step_refuses_bad_predictors_and_missing_cuda(monkeypatch):
    with pytest.raises(ValueError, match="unknown predictor"):
        main(["step", *TINY, "--predictors", "mlp", "directpredd"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="cuda"):
        main(["step", *TINY, "--device", "cuda"])
