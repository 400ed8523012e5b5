"""The linear model's simulation: every predictor by name, one curve per run, the collapse verdict."""

import pytest

from directpred_plugin.benchmarks.linear_model import (COLLAPSE_RATE, COLLAPSE_RATIO, SIMULATED_PREDICTORS,
                                                       LinearSetting, simulate, verdict)


def test_an_unknown_predictor_is_named():
    with pytest.raises(ValueError, match="predictor must be one of"):
        simulate(LinearSetting(steps=2), "mlp")
    with pytest.raises(ValueError, match="one value per run"):
        simulate(LinearSetting(steps=2), "gradient", weight_decay=[0.1, 0.2])


@pytest.mark.parametrize("predictor", list(SIMULATED_PREDICTORS))
def test_every_predictor_simulates_one_curve_per_run(predictor):
    out = simulate(LinearSetting(dim=4, batch=8, steps=3, runs=2, record_every=1), predictor)
    assert out["curves"]["step"] == [0, 1, 2, 3]
    assert all(len(norms) == 2 for norms in out["curves"]["norm"])
    assert len(out["verdict"]) == len(out["norm_ratio"]) == 2


def test_verdict_is_collapse_when_the_norm_is_gone_or_still_falling():
    assert verdict(COLLAPSE_RATIO / 2, 0.0) == "collapse"
    assert verdict(1.0, COLLAPSE_RATE * 2) == "collapse"
    assert verdict(1.0, 0.0) == "no collapse"
