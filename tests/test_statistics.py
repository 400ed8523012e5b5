"""The running statistics: the fold, pooling, the sum over ranks, and what a pool must be to count.

The EMA fold (raw and centred), the moments of a batch (``pool_moments_``), the sum over
ranks (``all_reduce_pool``), the bad-pool rule (every non-finite entry, overflow only once
pooled or summed over ranks, squares that underflow the dtype), the stable covariance of
``center=True``, the scale-invariant collapse indicator, and no collective without
``sync_dist``. Checked through the pure kernels of :mod:`directpred_plugin.functional` and
through the head that owns their state.
"""

import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import assert_same_state, call, make_batches, snapshot
from _reference import ReferenceHead, directpred_matrix
from directpred_plugin import VARIANTS, DirectPredHead
from directpred_plugin.functional import normalise_statistics
from directpred_plugin.functional import Pool, all_reduce_pool, collapse_indicator, empty_pool, fold_, pool_moments_

DIM = 6


def counters(head):
    return {name: int(getattr(head, name)) for name in ("num_updates", "num_skipped", "refreshed_at",
                                                        "refresh_rejections")}


def assert_only_skipped(head, before, before_counters, skips=1):
    """Statistics, W_p and counters as before, but ``skips`` more skipped steps."""
    assert_same_state(before, snapshot(head), ignore=["_extra_state"])
    assert counters(head) == {**before_counters, "num_skipped": before_counters["num_skipped"] + skips}


def make_pool(rows=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, DIM, generator=gen)
    return Pool(x.T @ x, x.sum(dim=0), torch.tensor(float(rows)))


def fold(pool, corr=None, updates=1, rho=0.3):
    corr = torch.eye(DIM) * 2.0 if corr is None else corr
    mean = torch.ones(DIM)
    num_updates = torch.tensor(updates)
    result = fold_(corr, mean, num_updates, pool, rho)
    return corr, mean, num_updates, result


def test_a_finite_pool_is_folded_as_the_ema():
    pool = make_pool()
    outer, total, rows = (t.clone() for t in pool)
    corr, mean, updates, (folded, skipped) = fold(pool)
    torch.testing.assert_close(corr, 0.3 * torch.eye(DIM) * 2.0 + 0.7 * outer / rows)
    torch.testing.assert_close(mean, 0.3 * torch.ones(DIM) + 0.7 * total / rows)
    assert bool(folded) and not bool(skipped) and int(updates) == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["outer-first", "outer-last", "outer-off-diagonal", "total", "rows"])
def test_any_non_finite_entry_skips_the_pool_and_changes_nothing(value, where):
    pool = make_pool()
    if where == "total":
        pool.total[DIM - 1] = value
    elif where == "rows":  # how a batch whose squares underflow marks its pool
        pool.rows.fill_(value)
    else:
        index = {"outer-first": (0, 0), "outer-last": (DIM - 1, DIM - 1), "outer-off-diagonal": (1, 4)}[where]
        pool.outer[index] = value
    corr, mean, updates, (folded, skipped) = fold(pool)
    assert torch.equal(corr, torch.eye(DIM) * 2.0)
    assert torch.equal(mean, torch.ones(DIM))
    assert bool(skipped) and not bool(folded) and int(updates) == 1
    assert all(bool(torch.isfinite(t).all()) for t in (pool.outer, pool.total))  # zeroed in place


def test_an_empty_pool_changes_nothing_and_is_not_a_skip():
    pool = empty_pool(DIM, torch.float32, torch.device("cpu"))
    corr, mean, updates, (folded, skipped) = fold(pool)
    assert torch.equal(corr, torch.eye(DIM) * 2.0) and int(updates) == 1
    assert not bool(folded) and not bool(skipped)


def test_the_first_fold_replaces_the_estimate():
    pool = make_pool()
    outer, _, rows = (t.clone() for t in pool)
    corr, _, updates, _ = fold(pool, corr=torch.full((DIM, DIM), 5.0), updates=0)
    torch.testing.assert_close(corr, outer / rows)
    assert int(updates) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_reads_matrices_vectors_and_scalars(bad):
    from directpred_plugin.functional import all_finite

    finite = (torch.ones(3, 3), torch.zeros(4), torch.tensor(2.0), torch.empty(0))
    assert bool(all_finite(*finite))
    for index in range(3):
        tensors = [t.clone() for t in finite]
        tensors[index].view(-1)[-1] = bad
        assert not bool(all_finite(*tensors))


def test_the_centred_fold_is_the_recurrence_of_f_hat_and_mu_without_its_cancellation():
    """corr holds F_hat - mu mu^T exactly as the raw recurrence of F_hat and mu gives it."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(9, DIM, generator=gen, dtype=torch.float64) + 2.0 for _ in range(4)]
    raw_f, raw_mu = torch.zeros(DIM, DIM, dtype=torch.float64), torch.zeros(DIM, dtype=torch.float64)
    cov, mean = torch.zeros_like(raw_f), torch.zeros_like(raw_mu)
    raw_updates, updates = torch.tensor(0), torch.tensor(0)
    for k, x in enumerate(batches):
        fold_(raw_f, raw_mu, raw_updates, Pool(x.T @ x, x.sum(0), torch.tensor(9.0, dtype=torch.float64)), 0.3)
        shift = x[0] * 0.5 + k  # any shift: the moments are of x - shift
        y = x - shift
        fold_(cov, mean, updates, Pool(y.T @ y, y.sum(0), torch.tensor(9.0, dtype=torch.float64)), 0.3, shift)
        torch.testing.assert_close(mean, raw_mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cov, raw_f - torch.outer(raw_mu, raw_mu), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- the moments of a batch
def _batches64(sizes, seed=11, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, DIM, generator=gen, dtype=torch.float64) + offset for n in sizes]


def test_pool_moments_sums_the_raw_moments_of_its_batches():
    x0, x1 = _batches64([5, 7])
    pool = empty_pool(DIM, torch.float64, torch.device("cpu"))
    pool_moments_(pool, None, x0, opens_pool=True, mean=None)
    pool_moments_(pool, None, x1, opens_pool=False, mean=None)
    x = torch.cat([x0, x1])
    torch.testing.assert_close(pool.outer, x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool.total, x.sum(0), rtol=1e-12, atol=1e-12)
    assert float(pool.rows) == 12.0


def test_pool_moments_centres_on_the_first_batch_and_folds_to_the_covariance():
    x0, x1 = _batches64([5, 7], offset=1e3)
    pool, shift = empty_pool(DIM, torch.float64, torch.device("cpu")), torch.zeros(DIM, dtype=torch.float64)
    mean = torch.zeros(DIM, dtype=torch.float64)
    pool_moments_(pool, shift, x0, opens_pool=True, mean=mean)
    torch.testing.assert_close(shift, x0.mean(0), rtol=1e-15, atol=0)
    pool_moments_(pool, shift, x1, opens_pool=False, mean=mean)
    torch.testing.assert_close(shift, x0.mean(0), rtol=1e-15, atol=0)  # fixed once the pool has rows
    x = torch.cat([x0, x1])
    torch.testing.assert_close(pool.outer, (x - shift).T @ (x - shift), rtol=1e-10, atol=1e-9)
    corr = torch.zeros(DIM, DIM, dtype=torch.float64)
    folded, skipped = fold_(corr, mean, torch.tensor(0), pool, 0.3, shift)
    assert bool(folded) and not bool(skipped)
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(corr, torch.cov(x.T, correction=0), rtol=1e-9, atol=1e-9)


def test_a_pool_opened_by_an_empty_batch_takes_its_shift_from_the_first_batch_with_rows():
    (x,) = _batches64([6], offset=-4.0)
    pool, shift = empty_pool(DIM, torch.float64, torch.device("cpu")), torch.zeros(DIM, dtype=torch.float64)
    mean = torch.full((DIM,), 2.0, dtype=torch.float64)
    pool_moments_(pool, shift, x[:0], opens_pool=True, mean=mean)
    assert torch.equal(shift, mean) and float(pool.rows) == 0  # no rows: the running mean
    pool_moments_(pool, shift, x, opens_pool=False, mean=mean)
    torch.testing.assert_close(shift, x.mean(0), rtol=1e-15, atol=0)
    assert float(pool.rows) == 6


@pytest.mark.parametrize("scale", [1e-25, 1e-30])
def test_pool_moments_marks_a_batch_whose_squares_underflow_and_the_fold_skips_it(scale):
    (x,) = _batches64([4])
    pool = empty_pool(DIM, torch.float32, torch.device("cpu"))
    pool_moments_(pool, None, (x * scale).float(), opens_pool=True, mean=None)
    assert math.isnan(float(pool.rows))
    corr = torch.eye(DIM)
    folded, skipped = fold_(corr, None, torch.tensor(1), pool, 0.3)
    assert bool(skipped) and not bool(folded) and torch.equal(corr, torch.eye(DIM))
    zeros = empty_pool(DIM, torch.float32, torch.device("cpu"))
    pool_moments_(zeros, None, torch.zeros(3, DIM), opens_pool=True, mean=None)
    assert float(zeros.rows) == 3  # an all-zero batch is representable


# ----------------------------------------------------------------------- the head's statistics
def overflowing_row(scale_of_sum=1.2, dim=DIM):
    """One row whose z^T z is finite in float32 but whose double is not (max ~3.4e38)."""
    return torch.full((1, dim), math.sqrt(torch.finfo(torch.float32).max / scale_of_sum))


def test_pool_that_overflows_only_once_pooled_is_skipped_and_training_resumes():
    batches = make_batches(6, dim=DIM)
    head = DirectPredHead(DIM, calls_per_update=2)
    ref = ReferenceHead(DIM)
    call(head, batches[0]), call(head, batches[1])
    ref.fold(torch.cat(batches[:2]).double().numpy())
    before, before_counters = snapshot(head), counters(head)
    row = overflowing_row()
    assert torch.isfinite(row.T @ row).all() and not torch.isfinite(2 * (row.T @ row)).all()
    call(head, row), call(head, row)
    assert_only_skipped(head, before, before_counters)
    with pytest.warns(RuntimeWarning, match="not representable"):  # the host learns of it one step later
        for view0, view1 in zip(batches[2::2], batches[3::2]):
            call(head, view0), call(head, view1)
            ref.fold(torch.cat([view0, view1]).double().numpy())
    assert int(head.num_updates) == ref.updates == 3
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-4)


DDP_STEPS, DDP_OVERFLOW_STEP = 5, 2


def _ddp_batches(rank):
    batches = make_batches(DDP_STEPS, batch=4 + 3 * rank, dim=DIM, seed=50 + rank)
    batches[DDP_OVERFLOW_STEP] = overflowing_row()  # finite on each rank, inf once summed
    return batches


def _rank_batch(rank, rows):
    """A float64 batch of ``rows`` rows per rank, far from the origin and from the other rank's."""
    return _batches64([rows], seed=70 + rank, offset=100.0 + 3.0 * rank)[0]


def _reduced_pools(rank):
    """``all_reduce_pool`` of each rank's pool: raw, centred, and centred with an empty rank 1."""
    results = {}
    mean = torch.full((DIM,), 7.0, dtype=torch.float64)
    for name, rows in (("raw", 5 + 2 * rank), ("centred", 5 + 2 * rank), ("centred-empty", 0 if rank else 5)):
        x = _rank_batch(rank, rows)
        pool = empty_pool(DIM, torch.float64, torch.device("cpu"))
        shift = None if name == "raw" else torch.zeros(DIM, dtype=torch.float64)
        pool_moments_(pool, shift, x, opens_pool=True, mean=mean)
        reduced, common = all_reduce_pool(pool, shift, None if name == "raw" else mean, None)
        results[name] = {"pool": [t.clone() for t in reduced], "shift": common}
    return results


def _ddp_overflow_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head = DirectPredHead(DIM, refresh="exact", calls_per_update=1)
        weights = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for z in _ddp_batches(rank):
                call(head, z)
                weights.append(head.weight.clone())
        torch.save({"state": snapshot(head), "counters": counters(head), "weights": weights,
                    "reduced": _reduced_pools(rank)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    """What the two gloo ranks of :func:`_ddp_overflow_worker` saved (spawned once for the module)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_overflow_worker, args=(2, port, str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.timeout(300)
def test_pool_that_overflows_only_after_the_all_reduce_is_skipped_on_every_rank(ddp_ranks):
    ranks = ddp_ranks
    assert_same_state(ranks[0]["state"], ranks[1]["state"])
    assert ranks[0]["counters"] == ranks[1]["counters"]
    state, weights, numbers = ranks[0]["state"], ranks[0]["weights"], ranks[0]["counters"]
    assert numbers["num_skipped"] == 1 and numbers["num_updates"] == DDP_STEPS - 1
    assert torch.isfinite(state["corr"]).all()
    assert torch.equal(weights[DDP_OVERFLOW_STEP], weights[DDP_OVERFLOW_STEP - 1])  # frozen by the skip only
    assert not torch.equal(weights[-1], weights[DDP_OVERFLOW_STEP])  # and updated again afterwards
    ref = ReferenceHead(DIM)
    for step, (z0, z1) in enumerate(zip(_ddp_batches(0), _ddp_batches(1))):
        if step != DDP_OVERFLOW_STEP:
            ref.fold(torch.cat([z0, z1]).double().numpy())
    np.testing.assert_allclose(state["weight"].numpy(), ref.W, atol=1e-4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["raw", "centred", "centred-empty"])
def test_all_reduce_pool_sums_the_moments_of_every_rank_about_a_common_shift(ddp_ranks, case):
    """Each rank's moments are about its own shift; summed, they are the moments of all rows
    about their mean (the row-weighted mean of the shifts), whichever rank has rows."""
    reduced = [ranks["reduced"][case] for ranks in ddp_ranks]
    for a, b in zip(reduced[0]["pool"], reduced[1]["pool"]):
        assert torch.equal(a, b)  # every rank holds the same sum
    rows = {"raw": [5, 7], "centred": [5, 7], "centred-empty": [5, 0]}[case]
    x = torch.cat([_rank_batch(rank, n) for rank, n in enumerate(rows)])
    if case == "raw":
        assert reduced[0]["shift"] is None and reduced[1]["shift"] is None
        centre = torch.zeros(DIM, dtype=torch.float64)
    else:
        assert torch.equal(reduced[0]["shift"], reduced[1]["shift"])
        centre = reduced[0]["shift"]
        torch.testing.assert_close(centre, x.mean(0), rtol=1e-14, atol=0)
    outer, total, count = reduced[0]["pool"]
    torch.testing.assert_close(outer, (x - centre).T @ (x - centre), rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(total, (x - centre).sum(0), rtol=1e-9, atol=1e-9)
    assert float(count) == len(x)


@pytest.mark.parametrize("refresh", ["exact", "iterative"])
def test_nan_batch_changes_no_state_but_the_skip_count_first_call_or_mid_training(refresh):
    head = DirectPredHead(DIM, refresh=refresh, calls_per_update=1)
    bad = make_batches(1, dim=DIM, seed=7)[0]
    bad[3, 2] = float("nan")
    for warm_up in (0, 3):
        for z in make_batches(warm_up, dim=DIM):
            call(head, z)
        before, before_counters = snapshot(head), counters(head)
        out = call(head, bad)
        assert out.shape == bad.shape
        assert_only_skipped(head, before, before_counters)
        if warm_up == 0:
            assert torch.equal(head.weight, torch.eye(DIM))  # not eps * I
            with pytest.warns(RuntimeWarning, match="not representable"):  # learned one step later
                call(head, make_batches(1, dim=DIM, seed=8)[0])
    assert int(head.num_skipped) == 2


@pytest.mark.parametrize("scale", [1e-25, 1e-30])
def test_a_batch_whose_squares_underflow_is_skipped_like_its_overflow_twin(scale):
    """float32 squares of 1e-25 are 0: folding them would claim F_hat = 0 and W_p = eps I."""
    batches = make_batches(3, dim=DIM)
    head = DirectPredHead(DIM, calls_per_update=1)
    call(head, batches[0])
    before, before_counters = snapshot(head), counters(head)
    call(head, batches[1] * scale)
    assert_only_skipped(head, before, before_counters)
    with pytest.warns(RuntimeWarning, match="stats_dtype=torch.float64"):
        call(head, batches[2])
    # float64 statistics hold that scale, and the rule is scale-free
    wide = DirectPredHead(DIM, stats_dtype=torch.float64, calls_per_update=1)
    call(wide, batches[1].double() * scale)
    exact = directpred_matrix(batches[1].double().T.numpy() @ batches[1].double().numpy(), 0.01)
    np.testing.assert_allclose(wide.weight.numpy(), exact, atol=1e-6)


def test_an_all_zero_batch_is_representable_and_folded():
    head = DirectPredHead(DIM, eps=0.1, calls_per_update=1)
    call(head, torch.zeros(4, DIM))
    assert int(head.num_updates) == 1 and int(head.num_skipped) == 0
    assert torch.allclose(head.weight, 0.1 * torch.eye(DIM))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_subnormal_statistics_are_normalised_like_their_normal_twin(variant):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, DIM, generator=gen)
    stats = x.T @ x / 20
    tiny = stats * 2.0**-135  # largest entry ~1e-40: subnormal in float32, digits intact to ~1e-6
    assert 0 < tiny.abs().max() < torch.finfo(torch.float32).tiny
    spacing = 2.0**-149 / float(tiny.abs().max())  # what a subnormal can still resolve, relative to the top
    torch.testing.assert_close(normalise_statistics(tiny), normalise_statistics(stats), rtol=0, atol=2 * spacing)
    expected = VARIANTS[variant](stats.double())
    got = VARIANTS[variant](tiny)
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-3


@pytest.mark.parametrize("calls_per_update", [1, "auto"])
def test_centred_statistics_in_float32_survive_a_large_common_offset(calls_per_update):
    """F_hat - mu mu^T of raw float32 moments loses everything to an offset of 1e4."""
    gen = torch.Generator().manual_seed(5)
    mixing = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    batches = [(torch.randn(64, DIM, generator=gen, dtype=torch.float64) @ mixing + 1e4).float() for _ in range(6)]
    head = DirectPredHead(DIM, center=True, refresh="exact", calls_per_update=calls_per_update)
    ref = ReferenceHead(DIM, center=True)
    for z in batches:
        out = call(head, z)
        if calls_per_update == "auto":
            out.sum().backward()  # leaf inputs: the backward pass ends the step
        ref.fold(z.double().numpy())
    assert int(head.num_updates) == len(batches)
    expected = ref.F - np.outer(ref.mu, ref.mu)
    np.testing.assert_allclose(head.corr.double().numpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    error = np.linalg.norm(head.weight.double().numpy() - ref.W) / np.linalg.norm(ref.W)
    assert error < 1e-3


# ----------------------------------------------------------------------- the collapse indicator
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_collapse_indicator_is_scale_invariant(dtype):
    z = make_batches(1, dim=DIM, dtype=dtype)[0]
    scales = [1.0, 1e-14, 1e14] + ([1e-100, 1e20, 1e100] if dtype == torch.float64 else [1e-18])
    readings = [float(collapse_indicator(z * scale)) for scale in scales]
    assert all(math.isfinite(r) for r in readings)
    assert readings == pytest.approx([readings[0]] * len(scales), rel=1e-5)
    assert 0.1 < readings[0] <= 1 / math.sqrt(DIM) + 1e-6


def test_the_collapse_indicator_with_the_largest_entry_given_reads_the_same():
    z = make_batches(1, dim=DIM)[0] * 1e-20
    reading = collapse_indicator(z)
    assert reading.dtype == torch.float32 and reading.dim() == 0
    assert torch.equal(collapse_indicator(z, z.abs().max()), reading)
    half = z.double().mul(1e20).bfloat16()  # half precision is read in float32, unscaled
    assert torch.equal(collapse_indicator(half), collapse_indicator(half.float()))


def test_the_collapse_indicator_is_a_reading_of_z_at_the_call_and_zero_for_a_collapsed_batch():
    z = make_batches(1, dim=DIM)[0].requires_grad_(True)
    reading = collapse_indicator(z)
    reported = float(reading)
    assert not reading.requires_grad
    with torch.no_grad():
        z.fill_(1.0)  # a fully collapsed batch, written after the call
    assert float(reading) == reported > 0.1
    assert float(collapse_indicator(z)) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------- steps and collectives
def test_empty_batch_is_an_empty_step():
    head = DirectPredHead(DIM, calls_per_update=1)
    call(head, make_batches(1, dim=DIM)[0])
    before, before_counters = snapshot(head), counters(head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call(head, torch.empty(0, DIM))
    assert out.shape == (0, DIM)
    assert_same_state(before, snapshot(head), ignore=["_extra_state"])
    assert counters(head) == before_counters  # neither an update nor a skip
    assert head.steps.steps == 2  # a step for the refresh schedule, and nothing else


@pytest.mark.parametrize("options", [dict(calls_per_update=1), dict(center=True, calls_per_update=1),
                                     dict(refresh="iterative", calls_per_update=1), dict(calls_per_update="auto"),
                                     dict(center=True, calls_per_update="auto")])
@pytest.mark.parametrize("sync_dist", [False, True])
def test_no_collective_without_sync_dist(monkeypatch, options, sync_dist):
    """A rank-local head must not call into torch.distributed at all (a collective would hang)."""
    calls = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    for name in ("all_reduce", "broadcast", "all_gather", "barrier", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    head = DirectPredHead(DIM, sync_dist=sync_dist, **options)
    for step, z in enumerate(make_batches(4, dim=DIM)):
        out = call(head, z)
        out.sum().backward()
    head.refresh()
    assert head.steps.steps == 4
    assert bool(calls) == sync_dist


@pytest.mark.parametrize("sync_dist", [False, True])
@pytest.mark.parametrize("center", [False, True])
def test_moments_stay_in_the_statistics_dtype_inside_autocast(monkeypatch, sync_dist, center):
    """The summed-over-ranks path forms x^T x out of place, where autocast would make it bf16."""
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: tensor)  # a world of one, twice
    head = DirectPredHead(DIM, calls_per_update=1, sync_dist=sync_dist, center=center, stats_dtype=torch.float64)
    z = make_batches(1, dim=DIM)[0].double() * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head(z.clone().requires_grad_(True))  # collected and folded (summed over "ranks") in one call
    x = z - z.mean(dim=0) if center else z
    torch.testing.assert_close(head.corr, x.T @ x / len(x), rtol=1e-12, atol=1e-12)
