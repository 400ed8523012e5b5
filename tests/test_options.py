"""Option validation: every option alone, and options that mean nothing together, are refused."""

import numpy as np
import pytest
import torch

from directpred_plugin import DirectPredHead
from directpred_plugin.options import check_refresh_options

DIM = 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-2.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(rho=1.0), "rho"),
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("inf")), "rho"),
        (dict(freq=0), "freq"),
        (dict(freq=True), "freq"),
        (dict(trainable="no"), "trainable"),
        (dict(center="False"), "center"),
        (dict(sync_dist=1), "sync_dist"),
        (dict(calls_per_update="two"), "calls_per_update"),
        (dict(calls_per_update=1.5), "calls_per_update"),
        (dict(calls_per_update=0), "calls_per_update"),
        (dict(variant="bogus"), "directcopy"),
        (dict(refresh="bogus"), "exact"),
        (dict(stats_dtype=torch.float16), "stats_dtype"),
        (dict(refresh_options=[("tol", 0.1)]), "refresh_options"),
        (dict(weight_momentum=1.0), "weight_momentum"),
        (dict(ridge=-1.0), "ridge"),
    ],
)
def test_each_invalid_option_is_refused_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectPredHead(DIM, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0.25), "alpha is DirectSet's power"),
        (dict(variant="directcopy", alpha=0.5), "alpha is DirectSet's power"),
        (dict(variant="ns", alpha=0.5), "alpha is DirectSet's power"),
        (dict(variant="directcopy", eps_inside=True), "eps_inside"),
        (dict(variant="visser", eps_inside=True), "eps_inside"),
        (dict(variant="ns", refresh="iterative"), "no iterative form"),
        (dict(variant="directset", alpha=0.25, refresh="iterative"), "no iterative form"),
        (dict(variant="directpred", eps_inside=True, refresh="iterative"), "no iterative form"),
        (dict(variant="stiefel", refresh_options={"tol": 0.1}), "does not use"),
        (dict(refresh="exact", refresh_options={"tol": 0.1}), "takes no refresh_options"),
        (dict(trainable=True), "freq=1 overwrites it"),
        (dict(trainable=True, freq=1, calls_per_update="auto"), "freq=1 overwrites it"),
        (dict(sync_dist=False, process_group=object()), "sync_dist=False sums nothing"),
        (dict(refresh="iterative", refresh_options={"tolerance": 0.1}), r"\['tolerance'\] are not options of the iterative"),
    ],
)
def test_options_that_mean_nothing_for_the_configuration_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectPredHead(DIM, **kwargs)


def test_options_that_mean_something_are_accepted():
    DirectPredHead(DIM, variant="directset", alpha=0.25)
    DirectPredHead(DIM, variant="directset", alpha=1.0, refresh="iterative")
    DirectPredHead(DIM, variant="directpred", eps_inside=True)
    DirectPredHead(DIM, variant="ns", refresh="exact")
    DirectPredHead(DIM, trainable=True, freq=5)
    DirectPredHead(DIM, refresh="iterative", refresh_options={"tol": 0.05})
    DirectPredHead(DIM, refresh="auto", refresh_options={"tol": 0.05})


def test_numpy_scalars_are_accepted_wherever_python_numbers_are():
    head = DirectPredHead(np.int64(DIM), freq=np.int32(2), calls_per_update=np.int64(2), rho=np.float32(0.5),
                          eps=np.float64(0.1), refresh="iterative", refresh_options={"tol": np.float32(0.05),
                                                                                      "squarings": np.int64(8)})
    assert (head.dim, head.freq, head.calls_per_update) == (DIM, 2, 2)
    assert all(type(v) is int for v in (head.dim, head.freq, head.calls_per_update))
    assert type(head.rho) is float and head.rho == 0.5
    assert head.refresh_options == {"tol": pytest.approx(0.05), "squarings": 8}
    assert type(head.refresh_options["tol"]) is float and type(head.refresh_options["squarings"]) is int


@pytest.mark.parametrize("calls_per_update", [1, 3])
def test_a_trainable_weight_needs_auto_steps(calls_per_update):
    """An integer pool would refresh a trainable W_p inside a step, before the optimizer used its gradient."""
    with pytest.raises(ValueError, match="trainable=True needs calls_per_update='auto'"):
        DirectPredHead(DIM, trainable=True, freq=2, calls_per_update=calls_per_update)
    assert DirectPredHead(DIM, trainable=True, freq=2).calls_per_update == "auto"


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(tol=0.0), "tol must be a number in \\(0, 1\\)"),
        (dict(tol=1.5), "tol"),
        (dict(squarings=0), "squarings"),
        (dict(sqrt_steps=2.5), "sqrt_steps"),
        (dict(sqrt_floor=0.0), "sqrt_floor"),
    ],
)
def test_strategy_options_are_validated_with_consistent_messages(options, match):
    with pytest.raises(ValueError, match=match):
        check_refresh_options(options)
    with pytest.raises(ValueError, match=match):
        DirectPredHead(DIM, refresh="iterative", refresh_options=options)
