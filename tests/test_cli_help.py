"""``directpred-bench --help`` states every option's real default, results.md of an incomplete run
says so, and the progress bar keeps a width in a terminal that reports none."""

from __future__ import annotations

import argparse
import io
import os
import re

import pytest

pytest.importorskip("sklearn", reason="the bench extra")

from directpred_plugin.benchmarks import cli  # noqa: E402
from directpred_plugin.benchmarks.data import DATASETS  # noqa: E402
from directpred_plugin.benchmarks.frameworks import FRAMEWORKS  # noqa: E402

#: compare's options that default to None and are resolved per dataset (DatasetDefaults)
PER_DATASET = {"epochs": "epochs", "batch_size": "batch_size", "proj_dim": "proj_dim", "hidden_dim": "hidden_dim"}


def _subparsers(monkeypatch) -> dict:
    monkeypatch.setenv("COLUMNS", "100000")  # one line per option: no wrapping
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _option_help(command: argparse.ArgumentParser) -> dict:
    """dest -> (action, its help as --help prints it, unwrapped)."""
    formatter = command._get_formatter()
    return {action.dest: (action, formatter._expand_help(action)) for action in command._actions
            if action.option_strings and action.dest != "help" and action.help is not None}


def _stated(value) -> str:
    return str(value)


def test_every_default_is_the_real_one(monkeypatch):
    checked = 0
    for name, command in _subparsers(monkeypatch).items():
        for dest, (action, line) in _option_help(command).items():
            default = action.default
            if isinstance(default, bool) or action.nargs == 0:
                continue  # flags: off unless given
            if default is not None:
                stated = re.search(r"\(default:? ([^)]*(?:\)[^)]*)?)\)?$", line) or re.search(r"default:? (.*)$", line)
                assert stated, f"{name} --{dest}: help does not state its default {default!r}: {line!r}"
                if name == "compare" and dest == "jobs":
                    assert default == min(os.cpu_count() or 1, 4) and "the CPU count, at most 4" in line
                elif name == "compare" and dest == "threads":
                    assert default == 1 and "(default: 1)" in line
                else:
                    assert f"(default: {default})" in line or f"(default {default}" in line, (name, dest, line)
            else:
                assert "default" in line, f"{name} --{dest}: defaults to None but the help does not say what that means"
            checked += 1
    assert checked > 30


def test_compare_states_the_resolved_defaults(monkeypatch):
    options = _option_help(_subparsers(monkeypatch)["compare"])
    predictors = options["predictors"][1]
    assert f"(default: {', '.join(FRAMEWORKS['lightly'].default_predictors)};" in predictors
    assert f"--framework solo: {', '.join(FRAMEWORKS['solo'].default_predictors)})" in predictors
    defaults = {name: DATASETS[name].defaults for name in ("digits", "fashion-mnist") if hasattr(DATASETS[name], "defaults")}
    assert defaults, "the in-memory datasets expose their defaults"
    epochs = options["epochs"][1]
    for dataset, values in defaults.items():
        assert f"{dataset} {values.epochs}" in epochs
    for dest in ("batch_size", "proj_dim", "hidden_dim"):
        stated = re.search(r"default[^0-9]*([\d /]+)", options[dest][1]).group(1).split("/")
        assert int(stated[0]) == getattr(defaults["digits"], dest), (dest, options[dest][1])
        assert int(stated[1]) == getattr(defaults["fashion-mnist"], dest), (dest, options[dest][1])


def test_a_zero_default_is_shown():
    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run")
    parser.add_argument("--threads", type=int, default=0, help="0 keeps PyTorch's default")
    text = " ".join(parser.format_help().split())
    assert "seed of the first run (default: 0)" in text
    assert "0 keeps PyTorch's default (default: 0)" in text


def test_incomplete_results_md_says_so():
    from directpred_plugin.benchmarks.report import markdown_table

    results = {
        "config": {"method": "byol", "dataset": "digits", "backbone": "small-cnn", "framework": "lightly",
                   "epochs": 1, "batch_size": 128, "proj_dim": 64, "hidden_dim": 256, "seeds": [0, 1],
                   "jobs": 1, "threads": 1},
        "machine": {"processor": "cpu", "cpu_count": 2, "torch": "2", "device": "cpu",
                    "load_average_1_5_15min_at_start": [0.1, 0.1, 0.1], "total_seconds": 12.0},
        "complete": False, "planned_runs": 2, "runs": [], "untrained": [], "summary": [],
        "collapse_isotropic_max": 0.125,
    }
    text = markdown_table(results)
    assert "None" not in text
    assert "incomplete: 0 of 2 runs so far" in text and "run incomplete" in text
    assert "scored on the test images" in text and "augmented training views" in text


def test_progress_bar_in_a_terminal_of_unknown_width(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((0, 0)))
    out = io.StringIO()
    bar = cli.progress_bar(range(4), desc="runs", file=out, mininterval=0)
    for _ in bar:
        pass
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"\|[#█]{30,}\|", last) and last.endswith("]"), last
