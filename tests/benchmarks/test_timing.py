"""The timing harness that speed and step share: interleaving, warm-up, medians and tables."""

import torch

from directpred_plugin.benchmarks.timing import (
    Column,
    interleaved_medians,
    machine_description,
    machine_line,
    markdown_table,
    seconds_per_item,
)


def test_rounds_interleave_the_blocks_and_the_warm_up_is_not_timed():
    calls = []
    returned = {"a": iter([100.0, 3.0, 1.0, 2.0]), "b": iter([100.0, 5.0, 6.0, 4.0])}

    def block(key):
        def run():
            calls.append(key)
            return next(returned[key])
        return run

    after = []
    medians = interleaved_medians({"a": block("a"), "b": block("b")}, rounds=3, warmup_rounds=1,
                                  after_block=lambda key, warming_up: after.append((key, warming_up)))
    assert calls == ["a", "b"] * 4
    assert after == [("a", True), ("b", True)] + [("a", False), ("b", False)] * 3
    assert medians == {"a": 2.0, "b": 5.0}  # the warm-up's 100 s is in neither


def test_seconds_per_item_runs_every_item_once():
    seen = []
    seconds = seconds_per_item(seen.append, [1, 2, 3], torch.device("cpu"))
    assert seen == [1, 2, 3] and seconds >= 0.0


def test_markdown_table_aligns_numeric_columns_right():
    columns = [Column("name", lambda r: r[0]), Column("ms", lambda r: f"{r[1]:.1f}", numeric=True)]
    assert markdown_table(columns, [("a", 1.25), ("b", 10.0)]).splitlines() == [
        "| name | ms |", "|---|---:|", "| a | 1.2 |", "| b | 10.0 |"]


def test_the_machine_line_is_the_description_in_one_line():
    info = machine_description(torch.device("cpu"))
    line = machine_line(torch.device("cpu"))
    assert line.startswith(f"{info['processor']}, {info['cpu_count']} logical CPUs; torch {info['torch']}; ")
    assert f"{info['torch_threads']} torch threads" in line
