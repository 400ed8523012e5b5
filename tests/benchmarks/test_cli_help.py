"""``directpred-bench --help`` states every option's real default in plain text and answers without
importing torch, a missing bench extra is one line naming the install, results.md of an
incomplete run says so."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the bench extra")

import _directpred_bench as cli  # noqa: E402
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


# ----------------------------------------------------------------------------- parsing without torch
def _imported_modules(importtime_log: str) -> set:
    """Module names from ``python -X importtime``'s report (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("words", [[], *[[name] for name in cli.COMMANDS]], ids=lambda words: " ".join(words) or "-")
def test_help_answers_without_importing_torch(words):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "_directpred_bench", *words, "--help"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: directpred-bench {' '.join(words)}".rstrip())
    imported = _imported_modules(done.stderr)
    assert "argparse" in imported  # the report is read right: the parser's own import is in it
    assert not imported & {"torch", "numpy", "directpred_plugin"}, sorted(imported & {"torch", "numpy"})


def test_a_full_command_line_parses_without_importing_torch():
    script = (
        "import sys, _directpred_bench as cli\n"
        "args = cli.build_parser().parse_args(['compare', '--epochs', '1', '--predictors', 'directpred:eps=0.1',"
        " 'mlp', '--seeds', '0', '--jobs', '1', '--no-progress'])\n"
        "assert args.command == 'compare' and args.epochs == 1, args\n"
        "print(sorted(name for name in ('torch', 'directpred_plugin', 'lightly') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_help_is_plain_text(monkeypatch):
    texts = [cli.build_parser().format_help()] + [command.format_help() for command in _subparsers(monkeypatch).values()]
    for text in texts:
        assert "`" not in text, text[:200]
        assert ":class:" not in text and ":func:" not in text and ":data:" not in text, text[:200]


@pytest.mark.parametrize("module", ["lightly", "sklearn"])
def test_a_missing_bench_extra_is_one_line_naming_the_install(module):
    # None in sys.modules makes the import fail as for a module that is not installed
    script = (f"import sys; sys.modules[{module!r}] = None\n"
              "import _directpred_bench\n"
              "_directpred_bench.main(['compare', '--epochs', '1', '--seeds', '0', '--jobs', '2', '--no-progress'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert {"lightly": "lightly", "sklearn": "scikit-learn"}[module] in line
    assert 'pip install -e ".[bench]"' in line and "Traceback" not in line


def test_the_command_line_states_the_codes_values():
    """The values _directpred_bench writes out (it cannot import them) are those of the benchmark code."""
    from dataclasses import asdict

    from directpred_plugin import VARIANTS
    from directpred_plugin.benchmarks import linear_model, step, theory
    from directpred_plugin.benchmarks.backbones import backbone_names
    from directpred_plugin.benchmarks.predictors import predictor_names

    import _directpred_bench as bench

    assert bench.COMPARE_PREDICTORS == predictor_names("compare") == predictor_names("step")
    assert bench.COMPARE_DEFAULT_PREDICTORS == {name: f.default_predictors for name, f in FRAMEWORKS.items()}
    assert bench.SPEED_BASELINES == tuple(name for name in predictor_names("speed") if name not in VARIANTS)
    assert bench.THEORY_SCENARIOS == tuple(theory.SCENARIOS)
    setting = asdict(linear_model.LinearSetting())
    assert bench.THEORY_SETTING == {key: setting[key] for key in bench.THEORY_SETTING}
    assert bench.STEP_BACKBONES == backbone_names("step") and bench.STEP_METHODS == tuple(step.METHODS)
    for command in bench.COMMANDS.values():
        assert callable(importlib.import_module(command.module).run)


def test_speed_runs_on_as_many_threads_as_compare_by_default(monkeypatch):
    options = {name: _option_help(command) for name, command in _subparsers(monkeypatch).items()}
    speed, compare = options["speed"]["threads"], options["compare"]["threads"]
    assert speed[0].default == compare[0].default == 1
    assert "0 keeps PyTorch's default" in speed[1] and "(default: 1)" in speed[1]
