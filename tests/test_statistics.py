"""The pool and the EMA fold: the bad-pool rule sees every non-finite entry, wherever it is."""

import pytest
import torch

from directpred_plugin.statistics import Pool, accumulate_, fold_

DIM = 6


def make_pool(rows=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pool = Pool(torch.zeros(DIM, DIM), torch.zeros(DIM), torch.zeros((), dtype=torch.long))
    accumulate_(pool, torch.randn(rows, DIM, generator=gen))
    return pool


def fold(pool, corr=None, updates=1, rho=0.3):
    corr = torch.eye(DIM) * 2.0 if corr is None else corr
    mean = torch.ones(DIM)
    num_updates = torch.tensor(updates)
    result = fold_(corr, mean, num_updates, pool, rho)
    return corr, mean, num_updates, result


def test_a_finite_pool_is_folded_as_the_ema():
    pool = make_pool()
    outer, total, rows = (t.clone() for t in pool)
    corr, mean, updates, result = fold(pool)
    torch.testing.assert_close(corr, 0.3 * torch.eye(DIM) * 2.0 + 0.7 * outer / rows)
    torch.testing.assert_close(mean, 0.3 * torch.ones(DIM) + 0.7 * total / rows)
    assert bool(result.folded) and not bool(result.skipped) and int(updates) == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["outer-first", "outer-last", "outer-off-diagonal", "total"])
def test_any_non_finite_entry_skips_the_pool_and_changes_nothing(value, where):
    pool = make_pool()
    if where == "total":
        pool.total[DIM - 1] = value
    else:
        index = {"outer-first": (0, 0), "outer-last": (DIM - 1, DIM - 1), "outer-off-diagonal": (1, 4)}[where]
        pool.outer[index] = value
    corr, mean, updates, result = fold(pool)
    assert torch.equal(corr, torch.eye(DIM) * 2.0)
    assert torch.equal(mean, torch.ones(DIM))
    assert bool(result.skipped) and not bool(result.folded) and int(updates) == 1


def test_an_empty_pool_changes_nothing_and_is_not_a_skip():
    pool = Pool(torch.zeros(DIM, DIM), torch.zeros(DIM), torch.zeros((), dtype=torch.long))
    corr, mean, updates, result = fold(pool)
    assert torch.equal(corr, torch.eye(DIM) * 2.0) and int(updates) == 1
    assert not bool(result.folded) and not bool(result.skipped)


def test_the_first_fold_replaces_the_estimate():
    pool = make_pool()
    outer, _, rows = (t.clone() for t in pool)
    corr, _, updates, _ = fold(pool, corr=torch.full((DIM, DIM), 5.0), updates=0)
    torch.testing.assert_close(corr, outer / rows)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_reads_matrices_vectors_and_scalars(bad):
    from directpred_plugin.rules import all_finite

    finite = (torch.ones(3, 3), torch.zeros(4), torch.tensor(2.0), torch.empty(0))
    assert bool(all_finite(*finite))
    for index in range(3):
        tensors = [t.clone() for t in finite]
        tensors[index].view(-1)[-1] = bad
        assert not bool(all_finite(*tensors))
