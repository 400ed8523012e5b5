"""What ``directpred-bench`` prints: speed's table on stdout, also without a progress bar or
--out; compare's few lines of summary and the files it wrote, not results.md's wide table."""

from __future__ import annotations

import pytest

pytest.importorskip("lightly", reason="the bench extra")
pytest.importorskip("sklearn", reason="the bench extra")

from _synthetic_results import synthetic_results  # noqa: E402

import _directpred_bench as cli  # noqa: E402
from directpred_plugin.benchmarks import compare  # noqa: E402
from directpred_plugin.benchmarks.report import markdown_table  # noqa: E402


def test_speed_without_progress_or_out_prints_its_table(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    predictors = ["simsiam-mlp", "directpred:refresh=exact"]
    argv = ["speed", "--dims", "16", "32", "--batch-size", "8", "--calls", "2", "--rounds", "1", "--no-errors",
            "--no-progress", "--predictors", *predictors]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0].startswith("| predictor | dim |") and len(lines) == 2 + 2 * len(predictors), out
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(row[0].strip("| "), row[1]) for row in rows] == [(p, d) for d in ("16", "32") for p in predictors]
    assert all(float(row[4]) > 0 for row in rows)  # ms per call
    assert "| predictor |" not in err
    assert list(tmp_path.iterdir()) == []  # no --out: nothing written


def test_compare_prints_a_short_summary_and_the_files(capsys, tmp_path, monkeypatch):
    results = synthetic_results(seeds=(0, 1), epochs=1)
    names = [row["predictor"] for row in results["summary"]]

    def fake_compare(cfg, out, command=None, resume=False):
        from directpred_plugin.benchmarks.report import write_outputs

        write_outputs(results, out)
        return results

    monkeypatch.setattr(compare, "compare", fake_compare)
    out_dir = tmp_path / "run"
    assert cli.main(["compare", "--epochs", "1", "--seeds", "0", "1", "--out", str(out_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) <= len(names) + 6, printed
    assert max(len(line.replace(str(out_dir), "runs/x")) for line in printed) < 120, printed
    assert not any(line.startswith("|") for line in printed)  # not the markdown table
    legend = markdown_table(results).split("\n\n")[2]  # results.md's paragraph explaining the columns
    assert legend.startswith("kNN top-1, linear top-1:") and legend[:60] not in "\n".join(printed)
    table = {line.split()[0]: line.split() for line in printed if line.startswith("  ") and line.split()[0] in names}
    assert list(table) == names
    best = max(results["summary"], key=lambda row: row["knn_top1_mean"])
    assert f"{100 * best['knn_top1_mean']:.1f}" == table[best["predictor"]][1]
    assert any(line.startswith("Best: ") and f"kNN {best['predictor']}" in line for line in printed)
    assert any("untrained backbone" in line for line in printed)
    wrote = printed[-1]
    assert wrote.startswith(f"Wrote {out_dir}/:")
    for name in ("results.md", "results.json", "results.csv", "accuracy.png", "curves.png"):
        assert name in wrote and (out_dir / name).is_file(), name
    assert "probes.png" not in wrote
