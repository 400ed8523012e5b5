"""The head's diagnostics: RankMe against the projections themselves, and what reading them costs."""

from __future__ import annotations

import math

import pytest
import torch
from _sync_counter import SyncCounter
from torch import nn

from directpred_plugin import DirectPredHead
from directpred_plugin.monitoring import head_metrics, named_heads

DIM = 16
EIGH = "aten::_linalg_eigh (eigh)"


def projections(rank: int, rows: int = 96, seed: int = 0) -> torch.Tensor:
    """Rows spanning ``rank`` directions with unequal scales (a partly collapsed batch)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))[0][:, :rank]
    scales = torch.logspace(0, -1.5, rank, dtype=torch.float64)
    return (torch.randn(rows, rank, generator=gen, dtype=torch.float64) * scales) @ basis.T


def rankme_of(z: torch.Tensor) -> float:
    """RankMe as Garrido et al. define it: exp of the entropy of the normalised singular values of ``z``."""
    singular = torch.linalg.svdvals(z)
    p = singular / singular.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


@pytest.mark.parametrize("rank", [DIM, 5, 1])
@pytest.mark.parametrize("rho", [0.0, None], ids=["rho0", "default-rho"])
def test_rankme_equals_rankme_of_the_projections_after_one_step(rank, rho):
    z = projections(rank)
    head = DirectPredHead(DIM, rho=rho, stats_dtype=torch.float64)
    head.update(z)  # one step: F_hat is z^T z / n whatever rho
    assert head.diagnostics()["rankme"] == pytest.approx(rankme_of(z), rel=1e-6, abs=1e-6)
    assert 1.0 - 1e-6 <= head.diagnostics()["rankme"] <= rank + 1e-6


def test_rankme_is_nan_before_any_update_and_follows_the_statistics():
    head = DirectPredHead(DIM, rho=0.0)
    assert math.isnan(head.diagnostics()["rankme"]) and math.isnan(head.diagnostics()["alignment"])
    head.update(projections(DIM).float())
    full = head.diagnostics()["rankme"]
    head.update(projections(2, seed=1).float())  # rho=0: F_hat is this batch's alone
    assert head.diagnostics()["rankme"] < full / 3


def test_diagnostics_are_the_device_values_and_the_schedule_counts():
    head = DirectPredHead(DIM, calls_per_update=1)
    for seed in range(3):
        head(projections(DIM, seed=seed).float().requires_grad_())
    tensors = head.diagnostic_tensors()
    assert all(t.dim() == 0 and t.dtype == torch.float64 for t in tensors.values())
    read = head.diagnostics()
    assert read == {**{k: float(v) for k, v in tensors.items()}, **head.schedule_counts()}
    assert read["num_updates"] == read["num_steps"] == 3
    assert read["alignment"] == pytest.approx(head.alignment())


def test_diagnostics_read_the_host_once():
    head = DirectPredHead(DIM)
    head.update(projections(DIM).float())
    with SyncCounter() as counter:
        head.diagnostics()
    # one read of all values; the rest are the two eigendecompositions' convergence checks
    assert counter.counts.pop("tolist (read)") == 1
    assert counter.counts.pop(EIGH) == 2
    assert counter.total == 0, dict(counter.counts)


def test_the_metrics_of_every_head_of_a_model_are_read_at_once():
    model = nn.ModuleDict({"first": DirectPredHead(DIM), "second": nn.Sequential(DirectPredHead(8))})
    model["first"].update(projections(DIM).float())
    heads = named_heads(model)
    assert [name for name, _ in heads] == ["first", "second.0"]
    with SyncCounter() as counter:
        metrics = head_metrics(heads, prefix="run")
    assert counter.counts.pop("tolist (read)") == 1
    assert counter.counts.pop(EIGH) == 4
    assert counter.total == 0, dict(counter.counts)
    assert metrics["run/first/rankme"] == pytest.approx(model["first"].diagnostics()["rankme"])
    assert metrics["run/first/num_updates"] == 1 and metrics["run/second.0/num_updates"] == 0
    assert math.isnan(metrics["run/second.0/alignment"])
    assert named_heads(DirectPredHead(4))[0][0] == "head"
