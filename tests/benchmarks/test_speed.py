"""Smoke test of ``directpred-bench speed``: a tiny run with exact and iterative refreshes side by side."""

import json

import pytest
import torch

from directpred_plugin.benchmarks import speed
from _directpred_bench import main
import directpred_plugin.head as head_module
import directpred_plugin.refresh as refresh


def test_speed_reports_cost_and_refresh_error_side_by_side(tmp_path):
    predictors = [
        "simsiam-mlp",
        "floor",
        "directpred:refresh=exact",
        "directpred:freq=2,refresh=iterative",
        "directcopy:refresh=iterative",
    ]
    argv = ["speed", "--dims", "16", "--batch-size", "8", "--calls", "4", "--rounds", "2", "--threads", "1",
            "--predictors", *predictors, "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {row["predictor"]: row for row in json.loads((tmp_path / "speed.json").read_text())}
    assert list(rows) == predictors
    assert all(row["ms_per_call"] > 0 and row["dim"] == 16 for row in rows.values())
    assert rows["simsiam-mlp"]["ratio_to_simsiam_mlp"] == 1.0
    # blocks of 4 // 2 = 2 calls: 2 warm-up calls + 2 rounds of 2 = 6 updates
    assert rows["directpred:refresh=exact"]["refreshes"] == 6
    assert rows["directpred:refresh=exact"]["max_error"] is None  # the reference itself
    assert rows["directpred:freq=2,refresh=iterative"]["refreshes"] == 3
    for name in ["directpred:freq=2,refresh=iterative", "directcopy:refresh=iterative"]:
        assert 0 <= rows[name]["max_error"] <= 1e-2
        assert rows[name]["fallbacks"] is not None
    assert rows["floor"]["refreshes"] is None
    table = (tmp_path / "speed.md").read_text()
    assert "| max error |" in table and "directcopy:refresh=iterative" in table


def _scaled_exact(stats, variant, options):
    """A refresh that is 5% off: the replay must report it."""
    weight, ok = _EXACT(stats, variant, options)
    return 1.05 * weight, ok


_EXACT = refresh.exact_candidate


def test_refresh_errors_replay_measures_each_refresh(monkeypatch):
    calls = [torch.randn(8, 16, requires_grad=True) for _ in range(3)]
    errors, fallbacks = speed.refresh_errors("directpred:refresh=iterative", 16, calls, torch.device("cpu"))
    assert len(errors) == 3 and max(errors) <= 1e-2 and fallbacks == 0
    again, _ = speed.refresh_errors("directpred:refresh=iterative", 16, calls, torch.device("cpu"))
    assert again == errors  # a replay sees the same F_hat sequence as the timed run
    monkeypatch.setattr(head_module, "exact_candidate", _scaled_exact)
    off, _ = speed.refresh_errors("directpred:freq=3,refresh=exact", 16, calls, torch.device("cpu"))
    assert off == pytest.approx([0.05], rel=1e-3)


def test_cuda_request_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="cuda"):
        main(["speed", "--dims", "8", "--device", "cuda", "--predictors", "floor"])


def test_speed_options_are_python_literals(tmp_path):
    argv = ["speed", "--dims", "8", "--batch-size", "8", "--calls", "2", "--rounds", "1", "--no-errors",
            "--no-progress", "--predictors", "directpred:eps=0.05", "--out", str(tmp_path)]
    assert main(argv) == 0
    (row,) = json.loads((tmp_path / "speed.json").read_text())
    assert row["predictor"] == "directpred:eps=0.05" and row["ms_per_call"] > 0
    with pytest.raises(ValueError, match="eps='0.05x'"):
        main(["speed", "--predictors", "directpred:eps=0.05x"])
    with pytest.raises(ValueError, match=r"unknown predictor 'directpredd' .*\['directpred', .*'visser', 'byol-mlp', "
                                         r"'simsiam-mlp', 'floor'\]"):
        main(["speed", "--predictors", "directpredd"])
    with pytest.raises(ValueError, match=r"speed does not take predictor 'mlp'"):
        main(["speed", "--predictors", "mlp"])  # the method's MLP: speed times the papers' widths
    with pytest.raises(ValueError, match=r"'floor' predictor takes no options"):
        main(["speed", "--predictors", "floor:freq=5"])
    with pytest.raises(ValueError, match=r"refresh"):
        main(["speed", "--predictors", "directpred:refresh=sometimes"])  # checked before any timing


def test_any_module_class_is_timed_by_import_path(tmp_path):
    """Another checkout's head (or any predictor class) runs in the same process as ours."""
    spec = "directpred_plugin.DirectPredHead:freq=3"
    argv = ["speed", "--dims", "8", "--batch-size", "8", "--calls", "2", "--rounds", "1", "--no-progress",
            "--predictors", "floor", spec, "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {row["predictor"]: row for row in json.loads((tmp_path / "speed.json").read_text())}
    assert rows[spec]["ms_per_call"] > 0 and rows[spec]["parameters"] == 0
    assert rows[spec]["refreshes"] is None  # not one of ours by spec: no error replay
    with pytest.raises(ValueError, match="cannot import 'no_such_package'"):
        main(["speed", "--predictors", "no_such_package.Head"])
    with pytest.raises(ValueError, match="not an nn.Module class"):
        main(["speed", "--predictors", "json.dumps"])
