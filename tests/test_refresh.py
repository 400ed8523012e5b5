"""Refresh strategies: the iterative (matmul-only) refresh against the exact rule, its
self-check and exact fallback, warm-start state on resume, and the deferred (sync-free)
update path, exercised on CPU."""

import warnings

import pytest
import torch

from directpred_plugin import VARIANTS, DirectPredHead
from directpred_plugin.refresh import AutoRefresh, ExactRefresh, IterativeRefresh

DIM = 48
BATCH = 16  # smaller than DIM: every batch correlation is rank-deficient


def spectrum(kind, dim=DIM):
    """Standard deviations along the principal axes of the synthetic embeddings."""
    index = torch.arange(1, dim + 1, dtype=torch.float64)
    if kind == "isotropic":
        variance = torch.ones(dim, dtype=torch.float64)
    elif kind == "power":
        variance = 1 / index
    elif kind == "steep":
        variance = index**-2.5
    elif kind == "near-degenerate":  # a 4-fold top and a flat bulk, both split by 1e-6
        variance = torch.where(index <= 4, 1.0, 1e-2) * (1 + 1e-6 * index)
    elif kind == "rank-deficient":
        variance = (index <= 6).to(torch.float64)
    else:
        raise ValueError(kind)
    return variance.sqrt()


def batches(kind, n=10, dim=DIM, batch=BATCH, seed=0, drift=0.05):
    """Embeddings whose principal axes rotate slowly, as during training."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    skew = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(drift * (skew - skew.T) / dim**0.5)
    std = spectrum(kind, dim)
    out = []
    for _ in range(n):
        out.append(((torch.randn(batch, dim, generator=gen, dtype=torch.float64) * std) @ basis.T).float())
        basis = rotation @ basis
    return out


def exact_weight(corr, variant, eps):
    return VARIANTS[variant](corr.to(torch.float64), eps)


def relative_error(weight, corr, variant, eps):
    reference = exact_weight(corr, variant, eps)
    return float((weight.to(torch.float64) - reference).norm() / reference.norm())


def fallbacks(head):
    return int(head.diagnostics()["refresh_fallbacks"])


def call(head, z):
    return head(z.clone().requires_grad_(True)).detach()


@pytest.mark.parametrize("variant", ["directpred", "directcopy"])
@pytest.mark.parametrize("kind", ["isotropic", "power", "steep", "near-degenerate", "rank-deficient"])
def test_iterative_refresh_within_one_percent_of_exact_at_every_refresh(kind, variant):
    head = DirectPredHead(DIM, variant=variant, refresh="iterative")
    worst = 0.0
    for z in batches(kind):
        call(head, z)  # freq=1: every call refreshes from the F_hat it just folded
        worst = max(worst, relative_error(head.weight, head.effective_corr(), variant, head.eps))
    assert worst <= 1e-2
    if kind != "rank-deficient":
        # the iteration itself produced these weights, not the exact fallback
        assert fallbacks(head) == 0


@pytest.mark.parametrize("options", [dict(center=True), dict(calls_per_update=2, freq=2), dict(stats_dtype=torch.float64)])
def test_iterative_refresh_with_center_pooling_and_float64(options):
    head = DirectPredHead(DIM, refresh="iterative", **options)
    checked = 0
    for z in batches("power", n=16):
        before = int(head.num_updates)
        call(head, z)
        if int(head.num_updates) != before and int(head.num_updates) % head.freq == 0:
            assert relative_error(head.weight, head.effective_corr(), "directpred", head.eps) <= 1e-2
            checked += 1
    assert checked >= 4 and fallbacks(head) == 0


def test_iterative_weight_differs_from_exact_bits_but_not_beyond_tolerance():
    """Guards against the iterative path silently being the exact one."""
    head = DirectPredHead(DIM, refresh="iterative")
    for z in batches("power", n=4):
        call(head, z)
    exact = ExactRefresh()(head.effective_corr(), "directpred", head.eps)
    assert not torch.equal(head.weight, exact)
    assert relative_error(head.weight, head.effective_corr(), "directpred", head.eps) <= 1e-2


@pytest.mark.parametrize(
    "variant, options",
    [("directpred", {"sqrt_steps": 1}), ("directcopy", {"lanczos_steps": 1}), ("directpred", {"lanczos_steps": 1})],
)
def test_capped_iteration_fails_its_check_and_falls_back_to_exact(variant, options):
    head = DirectPredHead(DIM, variant=variant, refresh="iterative", refresh_options=options)
    zs = batches("power", n=5)
    for k, z in enumerate(zs, start=1):
        call(head, z)
        expected = ExactRefresh()(head.effective_corr(), variant, head.eps)
        assert torch.equal(head.weight, expected)
        assert fallbacks(head) == k


def test_self_check_never_accepts_a_weight_beyond_its_tolerance():
    accepted = rejected = 0
    for kind in ["isotropic", "power", "steep", "near-degenerate", "rank-deficient"]:
        zs = batches(kind, n=6, seed=3)
        head = DirectPredHead(DIM, refresh="exact")
        for z in zs:
            call(head, z)
        corr = head.effective_corr()
        for variant in ["directpred", "directcopy"]:
            for steps in [1, 2, 3, 4, 6, 8, 10, 12]:
                for tol in [1e-2, 1e-3]:
                    strategy = IterativeRefresh(DIM, tol=tol, sqrt_steps=steps, lanczos_steps=min(steps * 3, 32))
                    weight, ok = strategy.propose(corr, variant, 0.01)
                    if bool(ok):
                        accepted += 1
                        assert relative_error(weight, corr, variant, 0.01) <= tol, (kind, variant, steps, tol)
                    else:
                        rejected += 1
    assert accepted > 50 and rejected > 50  # the check is neither vacuous nor always failing


def test_zero_correlation_gives_eps_identity_like_exact():
    for variant in ["directpred", "directcopy"]:
        weight = IterativeRefresh(8)(torch.zeros(8, 8), variant, 0.1)
        assert torch.allclose(weight, 0.1 * torch.eye(8))


@pytest.mark.parametrize("variant", ["directpred", "directcopy"])
def test_resume_with_iterative_warm_start_is_identical(variant):
    zs = batches("power", n=9)
    kwargs = dict(variant=variant, refresh="iterative", freq=2)
    straight = DirectPredHead(DIM, **kwargs)
    expected = [call(straight, z) for z in zs]
    first = DirectPredHead(DIM, **kwargs)
    outs = [call(first, z) for z in zs[:5]]
    state = first.state_dict()
    assert "refresher.warm" in state  # the warm start is saved
    resumed = DirectPredHead(DIM, **kwargs)
    resumed.load_state_dict(state)
    outs += [call(resumed, z) for z in zs[5:]]
    for a, b in zip(outs, expected):
        assert torch.equal(a, b)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_strategy_state_keeps_its_dtype_through_half():
    head = DirectPredHead(DIM, refresh="iterative")
    call(head, batches("power", n=1)[0])
    warm = head.refresher.warm.clone()
    head.half()
    assert head.refresher.warm.dtype == torch.float64 and torch.equal(head.refresher.warm, warm)


def test_auto_choice_by_variant_width_and_device():
    corr = torch.eye(4)
    small, wide = AutoRefresh(4), AutoRefresh(AutoRefresh.cpu_iterative_min_dim)
    assert small.choose(corr, "directpred") is small.exact
    assert small.choose(corr, "directcopy") is small.exact
    assert wide.choose(corr, "directcopy") is wide.iterative
    assert wide.choose(corr, "directpred") is wide.exact
    assert wide.choose(corr.to("meta"), "directpred") is wide.iterative


def test_refresh_options_are_validated():
    with pytest.raises(ValueError, match="bogus"):
        DirectPredHead(DIM, refresh="iterative", refresh_options={"bogus": 1})
    with pytest.raises(ValueError, match="tol"):
        DirectPredHead(DIM, refresh="iterative", refresh_options={"tol": 0})
    with pytest.raises(ValueError, match="sqrt_steps"):
        DirectPredHead(DIM, refresh="iterative", refresh_options={"sqrt_steps": 0})
    with pytest.raises(ValueError, match="refresh_options"):
        DirectPredHead(DIM, refresh_options=[("tol", 1e-3)])
    with pytest.raises(ValueError, match="deferred_checks"):
        DirectPredHead(DIM, deferred_checks="yes")


# ------------------------------------------------------------ deferred (sync-free) path
def _poisoned(zs, step):
    zs = [z.clone() for z in zs]
    zs[step][1, 2] = float("nan")
    return zs


@pytest.mark.parametrize("refresh", ["exact", "iterative"])
@pytest.mark.parametrize("calls_per_update", [1, 2])
def test_deferred_checks_end_in_the_state_of_host_checks(refresh, calls_per_update):
    zs = _poisoned(batches("power", n=12), step=5)
    kwargs = dict(refresh=refresh, calls_per_update=calls_per_update, freq=2, center=True)
    host = DirectPredHead(DIM, deferred_checks=False, **kwargs)
    deferred = DirectPredHead(DIM, deferred_checks=True, **kwargs)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for z in zs:
            call(host, z)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k, z in enumerate(zs):
            call(deferred, z)
            seen = [w for w in record if "non-finite" in str(w.message)]
            assert len(seen) == (1 if k > 5 else 0)  # learnt one call after the bad batch
    assert int(deferred.num_skipped) == int(host.num_skipped) == 1
    assert int(deferred.num_updates) == int(host.num_updates)
    torch.testing.assert_close(deferred.corr, host.corr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(deferred.mean, host.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(deferred.weight, host.weight, rtol=1e-3, atol=1e-3)


def test_deferred_steady_state_reads_nothing_from_tensors(monkeypatch):
    head = DirectPredHead(DIM, refresh="iterative", deferred_checks=True, freq=1)
    zs = batches("power", n=8)
    call(head, zs[0])
    call(head, zs[1])
    reads = []
    allowed = {"tolist"}  # the lagged counter snapshot, a host copy made a call earlier

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not (name in allowed and self is head._lagged._host):
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ["__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy"]:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for z in _poisoned(zs[2:], step=2):
            head(z.clone().requires_grad_(True)).square().mean().backward()
    monkeypatch.undo()
    assert reads == []
    assert int(head.num_skipped) == 1 and int(head.num_updates) == 7
    assert relative_error(head.weight, head.effective_corr(), "directpred", head.eps) <= 1e-2


def test_deferred_rejection_keeps_weight_then_refreshes_exactly_one_call_later():
    head = DirectPredHead(DIM, refresh="iterative", deferred_checks=True, refresh_options={"sqrt_steps": 1})
    zs = batches("power", n=4)
    call(head, zs[0])
    assert torch.equal(head.weight, torch.eye(DIM))  # the proposal failed its check: kept
    assert int(head.refresh_rejections) == 1
    corr_after_first = head.effective_corr().clone()
    call(head, zs[1])  # learns of the rejection first, refreshes with the checked path
    expected = ExactRefresh()(corr_after_first, "directpred", head.eps)
    assert torch.equal(head.weight, expected)
    assert head.diagnostics()["refresh_fallbacks"] >= 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("calls_per_update", [1, 2])
def test_deferred_checks_under_ddp_match_one_process(tmp_path, calls_per_update):
    from test_distributed import _rank_batches, _run_two_ranks

    kwargs = dict(freq=2, center=True, stats_dtype=torch.float64, calls_per_update=calls_per_update,
                  deferred_checks=True, refresh="iterative")
    states = _run_two_ranks(tmp_path, **kwargs)
    single = DirectPredHead(6, **kwargs)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for z0, z1 in zip(_rank_batches(0), _rank_batches(1)):
            single(torch.cat([z0, z1]).requires_grad_(True))  # warned a call after the bad one
    expected = single.state_dict()
    for key in ["corr", "mean", "weight"]:
        assert torch.equal(states[0][key], states[1][key]), key
    torch.testing.assert_close(states[0]["corr"], expected["corr"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(states[0]["mean"], expected["mean"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(states[0]["weight"], expected["weight"], rtol=1e-3, atol=1e-3)
    assert int(states[0]["num_skipped"]) == int(states[1]["num_skipped"]) == 1
