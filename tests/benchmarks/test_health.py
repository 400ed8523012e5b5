"""``directpred-bench health-plot``: RankMe and alignment from a Lightning metrics.csv."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("matplotlib", reason="the bench extra")

import _directpred_bench as cli  # noqa: E402
from directpred_plugin.benchmarks.health import read_health  # noqa: E402


def write_metrics(path, rows):
    columns = sorted({key for row in rows for key in row})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_health_plot_reads_every_heads_rankme_and_alignment(tmp_path, capsys):
    metrics = tmp_path / "metrics.csv"
    write_metrics(metrics, [
        {"step": 4, "directpred/predictor/rankme": 12.5, "directpred/predictor/alignment": 1.0,
         "directpred/predictor2/rankme": 3.0, "directpred/predictor/num_updates": 5},
        {"step": 5, "train_loss": -0.5},  # a row of other metrics
        {"step": 9, "directpred/predictor/rankme": 10.0, "directpred/predictor/alignment": "nan"},
    ])
    assert read_health(metrics) == {
        "directpred/predictor": {"rankme": [(4, 12.5), (9, 10.0)], "alignment": [(4, 1.0)]},
        "directpred/predictor2": {"rankme": [(4, 3.0)]},
    }
    out = tmp_path / "plots" / "health.png"
    assert cli.main(["health-plot", str(metrics), "--labels", "run", "--title", "t", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


def test_health_plot_names_what_is_missing(tmp_path):
    metrics = tmp_path / "metrics.csv"
    write_metrics(metrics, [{"step": 1, "train_loss": 0.1}])
    with pytest.raises(ValueError, match=r"no column ending in /rankme or /alignment.*log_every_n_steps"):
        read_health(metrics)
    with pytest.raises(ValueError, match="--labels names 2 runs for 1 files"):
        cli.main(["health-plot", str(metrics), "--labels", "a", "b", "--out", str(tmp_path / "x.png")])
