import json

import pytest

pytest.importorskip("matplotlib")

import _directpred_bench as cli
from directpred_plugin.benchmarks import theory
from directpred_plugin.benchmarks.linear_model import LinearSetting

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

# A reduced configuration of the linear model: fewer steps and runs, a 2 x 2 sweep.
REDUCED = ["--dim", "8", "--steps", "2000", "--runs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    argv = ["theory", *REDUCED, "--sweep-weight-decay", "0", "0.4", "--sweep-ema-rate", "0.02", "1",
            "--out", str(out)]
    assert cli.main(argv) == 0
    return out, json.loads((out / "theory.json").read_text())


def test_outputs_written(reduced):
    out, results = reduced
    assert results["schema"] == theory.SCHEMA
    assert (out / "theory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "theory.md").read_text()
    assert "| claim | scenario |" in table and "(e) SGD-trained W_p" in table
    assert set(results["scenarios"]) == set(theory.SCENARIOS)


def test_a_no_predictor_collapses(reduced):
    r = reduced[1]["scenarios"]["no-predictor"]
    assert r["verdict"] == ["collapse", "collapse"]
    assert max(r["norm_ratio"]) < 0.2 and max(r["late_log_rate_per_1k_steps"]) < -1.0


def test_b_no_stop_gradient_collapses(reduced):
    r = reduced[1]["scenarios"]["no-stop-gradient"]
    assert r["verdict"] == ["collapse", "collapse"]
    assert max(r["norm_ratio"]) < 1e-6


@pytest.mark.parametrize("name", ["gradient-predictor", "directpred-sqrt", "symmetric-predictor"])
def test_c_trained_predictor_and_directpred_do_not_collapse(reduced, name):
    r = reduced[1]["scenarios"][name]
    assert r["verdict"] == ["no collapse", "no collapse"]
    assert min(r["norm_ratio"]) > 0.3


def test_d_symmetric_predictor_aligns_with_F(reduced):
    r = reduced[1]["scenarios"]["symmetric-predictor"]
    assert max(r["initial_alignment"]) < 0.6
    assert min(r["final_alignment"]) > 0.98
    curve = [sum(a) / len(a) for a in r["curves"]["alignment"]]
    assert curve[len(curve) // 2] > curve[0] + 0.3


def test_shipped_directpred_keeps_alignment_but_loses_scale_in_the_l2_model(reduced):
    """The documented caveat: p_max = 1 + eps shrinks ||W|| here, while the sqrt(s_j) form does not."""
    scenarios = reduced[1]["scenarios"]
    shipped, sqrt_form = scenarios["directpred"], scenarios["directpred-sqrt"]
    assert min(shipped["final_alignment"]) > 0.95
    assert max(shipped["late_log_rate_per_1k_steps"]) < 3 * min(sqrt_form["late_log_rate_per_1k_steps"]) - 0.1
    assert max(shipped["norm_ratio"]) < min(sqrt_form["norm_ratio"])


def test_e_weight_decay_sweep(reduced):
    sweep = reduced[1]["sweep"]
    cells = {(w, e): v for w, e, v in zip(sweep["weight_decay"], sweep["ema_rate"], sweep["verdict"])}
    assert cells[(0.0, 0.02)] == cells[(0.0, 1.0)] == "no collapse"
    assert cells[(0.4, 0.02)] == cells[(0.4, 1.0)] == "collapse"  # above 1 / (4 (1 + sigma^2)) = 0.2


def test_bad_scenario_is_named():
    with pytest.raises(ValueError, match="no-predictor"):
        theory.theory(LinearSetting(steps=2), ["no-such-thing"], [], [], progress=False)
