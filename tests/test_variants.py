"""The closed-form family inside the head: each name's rule and the options it stands for."""

import numpy as np
import pytest
import torch
from torch import nn

from _reference import directcopy_matrix, directpred_matrix, directset_matrix, normalised, ns_fourth_root, ns_sqrt, stiefel, visser
from directpred_plugin import VARIANTS, DirectPredHead
from directpred_plugin.functional import eigenspace_alignment
from directpred_plugin.variants import variant_defaults

DIM = 10


def _batches(n=4, batch=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0, DIM, dtype=torch.float64)
    return [torch.randn(batch, DIM, generator=gen, dtype=torch.float64) @ mixing for _ in range(n)]


# Independent NumPy re-statements of each member on the normalised statistics (eps = 0 in the head).
PURE_RULES = {
    "directpred": lambda m: directpred_matrix(m, 0.0),
    "directpred-hybrid": lambda m: directpred_matrix(m, 0.0),
    "directcopy": lambda m: directcopy_matrix(m, 0.0),
    "directset": lambda m: directset_matrix(m, 0.0, 0.25),
    "ns": ns_sqrt,
    "ns2": ns_fourth_root,
    "stiefel": stiefel,
    "visser": visser,
}


def test_every_variant_has_an_independent_reference():
    assert set(PURE_RULES) == set(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_head_weight_is_the_members_pure_rule_on_normalised_statistics(variant, ridge):
    alpha = {"alpha": 0.25} if variant == "directset" else {}  # the other members refuse it
    # freq=1, not trainable: each call a step of its own (the hybrid's schedule is tested elsewhere)
    head = DirectPredHead(DIM, variant=variant, eps=0.0, ridge=ridge, rho=0.3, freq=1, trainable=False,
                          stats_dtype=torch.float64, refresh="exact", **alpha)
    corr = None
    for z in _batches():
        head(z)  # an input without grad: a step of its own
        c = (z.T @ z / len(z)).numpy()
        corr = c if corr is None else 0.3 * corr + 0.7 * c
    expected = PURE_RULES[variant](normalised(corr, ridge))
    np.testing.assert_allclose(head.weight.numpy(), expected, rtol=1e-8, atol=1e-10)
    # every member shares the eigenvectors of the statistics it was built from
    assert float(eigenspace_alignment(head.weight, head.corr)) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_weight_is_invariant_to_the_scale_of_the_input(variant):
    heads = [DirectPredHead(DIM, variant=variant, freq=1, trainable=False, stats_dtype=torch.float64, refresh="exact")
             for _ in range(2)]
    for z in _batches(3):
        heads[0](z)  # inputs without grad: a step each
        heads[1](z * 1e6)
    torch.testing.assert_close(heads[0].weight, heads[1].weight, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha, eps_inside", [(0.5, False), (1.0, False), (0.25, True), (2.0, False)])
def test_directset_powers_and_eps_placement(alpha, eps_inside):
    head = DirectPredHead(DIM, variant="directset", alpha=alpha, eps=0.05, eps_inside=eps_inside,
                          stats_dtype=torch.float64, refresh="exact")
    z = _batches(1)[0]
    head(z)  # an input without grad: a step of its own
    expected = directset_matrix(normalised((z.T @ z / len(z)).numpy()), 0.05, alpha, eps_inside)
    np.testing.assert_allclose(head.weight.numpy(), expected, rtol=1e-9, atol=1e-12)
    if alpha == 0.5 and not eps_inside:
        plain = DirectPredHead(DIM, eps=0.05, stats_dtype=torch.float64, refresh="exact")
        plain(z)
        torch.testing.assert_close(head.weight, plain.weight)


def test_weight_momentum_averages_successive_rules():
    head = DirectPredHead(DIM, variant="ns", weight_momentum=0.9, rho=0.0, eps=0.0,
                          stats_dtype=torch.float64, refresh="exact")
    batches = _batches(2)
    head(batches[0])
    first = ns_sqrt(normalised((batches[0].T @ batches[0] / len(batches[0])).numpy()))
    np.testing.assert_allclose(head.weight.numpy(), first, rtol=1e-9, atol=1e-12)  # first refresh: no average
    head(batches[1])
    second = ns_sqrt(normalised((batches[1].T @ batches[1] / len(batches[1])).numpy()))
    np.testing.assert_allclose(head.weight.numpy(), 0.9 * first + 0.1 * second, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name, options, message", [
    ("alpha", -1.0, "alpha is DirectSet's power"), ("ridge", -0.1, "ridge"), ("weight_momentum", 1.0, "weight_momentum"),
    ("eps_inside", "yes", "eps_inside"),
])
def test_family_options_are_checked(name, options, message):
    with pytest.raises(ValueError, match=message):
        DirectPredHead(DIM, **{name: options})


def test_every_benchmark_name_builds_a_predictor_and_the_closed_form_ones_are_heads():
    pytest.importorskip("lightly")
    from directpred_plugin.benchmarks.predictors import build_predictor, predictor_names

    assert set(VARIANTS) <= set(predictor_names("compare")) and set(VARIANTS) <= set(predictor_names("speed"))
    for name in predictor_names("compare"):
        module = build_predictor(name, DIM, 16)
        out = module.train()(torch.randn(8, DIM, requires_grad=True))
        assert out.shape == (8, DIM), name
        assert isinstance(module, DirectPredHead) == (name in VARIANTS), name
    assert build_predictor("mlp", DIM, 16).__class__.__name__ == "BYOLPredictionHead"
    assert build_predictor("mlp", DIM, 16, method="simsiam").__class__.__name__ == "SimSiamPredictionHead"
    assert isinstance(build_predictor("linear", DIM, 16), nn.Linear)
    with pytest.raises(ValueError, match="unknown predictor"):
        build_predictor("bogus", DIM, 16)
    with pytest.raises(ValueError, match="no options"):
        build_predictor("none", DIM, 16, eps=0.1)


def test_a_name_stands_for_its_defaults_and_given_options_win():
    head = DirectPredHead(DIM)
    assert (head.rho, head.eps, head.freq, head.trainable) == (0.3, 0.01, 1, False)
    ns = DirectPredHead(DIM, variant="ns")
    assert (ns.variant, ns.rho, ns.eps) == ("ns", 0.0, 0.0)  # per-step statistics, pure rule
    assert DirectPredHead(DIM, variant="ns", rho=0.5).rho == 0.5
    assert DirectPredHead(DIM, variant="ns", eps=0.02).eps == 0.02
    hybrid = DirectPredHead(DIM, variant="directpred-hybrid")
    assert hybrid.trainable and hybrid.freq == 5 and isinstance(hybrid.weight, nn.Parameter)
    assert variant_defaults("directpred-hybrid") == {"rho": 0.3, "eps": 0.01, "freq": 5, "trainable": True}
    with pytest.raises(ValueError, match="variant must be one of"):
        DirectPredHead(DIM, variant="bogus")
    with pytest.raises(ValueError, match="freq=1 overwrites it"):  # the name's trainable with a given freq
        DirectPredHead(DIM, variant="directpred-hybrid", freq=1)


def test_adapters_take_the_names_defaults():
    from lightly.models.modules import BYOLPredictionHead

    from directpred_plugin.lightly import replace_prediction_heads
    from directpred_plugin.solo import build_directpred

    (replaced,) = replace_prediction_heads(nn.Sequential(BYOLPredictionHead(DIM, 16, DIM)), predictor="ns", ridge=0.1)
    assert (replaced.new.variant, replaced.new.rho, replaced.new.eps, replaced.new.ridge) == ("ns", 0.0, 0.0, 0.1)
    solo = build_directpred(DIM, {"variant": "ns", "weight_momentum": 0.5}, calls_per_step=1)
    assert (solo.variant, solo.rho, solo.eps, solo.weight_momentum) == ("ns", 0.0, 0.0, 0.5)
    assert build_directpred(DIM, {}, calls_per_step=1).rho == 0.3


def test_a_name_fixes_its_variant():
    pytest.importorskip("lightly")
    from lightly.models.modules import BYOLPredictionHead

    from directpred_plugin.lightly import replace_prediction_heads
    from directpred_plugin.solo import build_directpred

    # the name's own variant may be repeated; another would be that variant with this name's defaults
    assert build_directpred(DIM, {"variant": "ns"}, calls_per_step=1, predictor="ns").variant == "ns"
    model = nn.Sequential(BYOLPredictionHead(DIM, 16, DIM))
    for build in (lambda: replace_prediction_heads(model, predictor="ns", variant="directpred"),
                  lambda: build_directpred(DIM, {"variant": "directcopy"}, calls_per_step=1,
                                           predictor="directpred-hybrid")):
        with pytest.raises(ValueError, match=r"variant='\w+'"):
            build()


# ------------------------------------------------------------ one name, one module everywhere
def head_options(head):
    """The options a head was built with, wherever the head keeps them."""
    names = ("variant", "rho", "eps", "freq", "trainable", "center", "stats_dtype", "sync_dist", "refresh_strategy",
             "refresh_options", "alpha", "eps_inside", "ridge", "weight_momentum")
    found = {}
    for name in names:
        for source in (head, getattr(head, "options", None), getattr(head, "rule_options", None)):
            if source is not None and hasattr(source, name):
                found[name] = getattr(source, name)
                break
    assert {"variant", "rho", "eps", "freq", "trainable", "alpha", "ridge"} <= set(found)  # not vacuous
    return found


def builders():
    """Every entry point that builds a predictor by name -> (build(name, dim), its calls_per_update)."""
    pytest.importorskip("lightly")
    from directpred_plugin.benchmarks import predictors as bench, speed
    from directpred_plugin.solo import build_directpred

    return {
        "head": (lambda name: DirectPredHead(DIM, variant=name), "auto"),
        "compare": (lambda name: bench.build_predictor(name, DIM, 16), "auto"),
        "speed": (lambda name: speed._build(name, DIM, torch.device("cpu")), "auto"),
        # the adapter's option resolution, as for `method_kwargs.predictor: <name>` without options
        "solo": (lambda name: build_directpred(DIM, {}, calls_per_step=2, predictor=name), "auto"),
    }


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_closed_form_name_builds_the_same_head_through_every_entry_point(name):
    heads = {where: build(name) for where, (build, _) in builders().items()}
    reference = head_options(heads["head"])
    expected = variant_defaults(name)
    assert all(reference[key] == value for key, value in expected.items())  # the name's defaults
    for where, head in heads.items():
        assert type(head) is DirectPredHead, where
        assert head_options(head) == reference, where
        assert head.calls_per_update == builders()[where][1], where


def test_the_benchmarks_solo_config_names_the_same_predictor_with_the_given_options():
    pytest.importorskip("lightly")
    from directpred_plugin.benchmarks.predictors import solo_method_kwargs

    assert solo_method_kwargs("ns:freq=3") == {"predictor": "ns", "directpred": {"freq": 3}}
    assert solo_method_kwargs("directpred-hybrid") == {"predictor": "directpred-hybrid", "directpred": {}}
    assert solo_method_kwargs("mlp") == {"predictor": "mlp"}
