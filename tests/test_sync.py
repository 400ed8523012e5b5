"""No host-device waits in steady-state training, counted on the CPU (``_sync_counter.py``).

The same check runs on a GPU under ``torch.cuda.set_sync_debug_mode("error")`` in
``test_head.py``; this one runs everywhere, so a sync added to the hot path fails CI. A
refused iterative result is recomputed thoroughly without a wait; only a second refusal in
a row makes the next refresh exact, and that one waits.
"""

import warnings

import pytest
import torch

from _helpers import DIM, TinySimSiam, record_levels, refuse, sgd_step, views
from _sync_counter import SyncCounter
from directpred_plugin import DirectPredHead

WARM_UP, STEPS = 3, 8


def steady_state(**options):
    """Counter after ``STEPS`` BYOL steps (SGD with momentum) that follow ``WARM_UP`` steps."""
    torch.manual_seed(0)
    model = TinySimSiam(DirectPredHead(DIM, calls_per_update="auto", **options))  # steps end at optimizer.step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(WARM_UP):
        sgd_step(model, optimizer, *views(step))
    with SyncCounter() as counter:
        for step in range(WARM_UP, WARM_UP + STEPS):
            sgd_step(model, optimizer, *views(step))
    return counter, model.head


def test_the_counter_sees_reads_data_dependent_shapes_and_eigh():
    x = torch.randn(4)
    tolist = torch.Tensor.tolist
    with SyncCounter() as counter:
        x.sum().item()
        bool(x[0] > 0)
        x.tolist()
        x[x > 0]
        torch.nonzero(x)
        torch.linalg.eigh(torch.eye(3))
        torch.where(x > 0, x, -x).sum()  # stays on the device: not counted
    assert counter.total == 6, counter.counts
    assert counter.counts["aten::_local_scalar_dense (read)"] == 2
    assert torch.Tensor.tolist is tolist  # the wrappers are gone afterwards


@pytest.mark.parametrize(
    "options",
    [{}, {"freq": 5}, {"variant": "directcopy"}, {"trainable": True, "freq": 5}],
    ids=["directpred", "freq=5", "directcopy", "hybrid-freq=5"],
)
def test_cuda_default_configuration_makes_no_host_waits_in_steady_state(options):
    """``refresh="iterative"`` is what ``"auto"`` picks on accelerators."""
    counter, head = steady_state(refresh="iterative", **options)
    assert counter.total == 0, dict(counter.counts)
    assert counter.mirror_reads == STEPS  # the lagged counters, one host-memory read per step
    assert int(head.refresh_rejections) == 0
    freq, steps = options.get("freq", 1), WARM_UP + STEPS
    # every optimizer step ends its step (fold, and every freq-th a refresh), trainable W_p or not
    assert head.steps.steps == int(head.num_updates) == steps and head.steps.calls == 0
    assert int(head.refreshed_at) == steps // freq * freq


@pytest.mark.parametrize("freq", [1, 5])
def test_the_exact_refresh_is_counted_as_waiting(freq):
    """Not vacuous: the exact rule's eigh (its info check) and its finiteness read are seen."""
    counter, head = steady_state(refresh="exact", freq=freq)
    refreshes = len([s for s in range(WARM_UP, WARM_UP + STEPS) if s % freq == 0])
    assert counter.counts["aten::_linalg_eigh (eigh)"] == refreshes
    assert counter.counts["aten::_local_scalar_dense (read)"] == refreshes
    assert counter.total == 2 * refreshes > 0


def refusing_steady_state(monkeypatch, refused, **options):
    """Like :func:`steady_state`, with the iterative refresh refusing every candidate of the
    ``refused`` levels during the counted steps; also the level of each refresh run then."""
    torch.manual_seed(0)
    model = TinySimSiam(DirectPredHead(DIM, refresh="iterative", **{"calls_per_update": "auto", **options}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(WARM_UP):
        sgd_step(model, optimizer, *views(step))
    refuse(monkeypatch, *refused)
    levels = record_levels(monkeypatch)
    closes = model.head.steps.steps
    with warnings.catch_warnings(), SyncCounter() as counter:
        warnings.simplefilter("ignore")  # the refusal's warning
        for step in range(WARM_UP, WARM_UP + STEPS):
            sgd_step(model, optimizer, *views(step))
    closes = model.head.steps.steps - closes
    assert closes == STEPS * (2 if options.get("calls_per_update") == 1 else 1)  # one per view with 1
    assert counter.mirror_reads == closes  # one per close, no wait
    return counter, model.head, levels


@pytest.mark.parametrize(
    "options",
    [{}, {"freq": 3}, {"variant": "directcopy"}, {"trainable": True, "freq": 3}, {"trainable": True, "freq": 2},
     {"calls_per_update": 1}],
    ids=["directpred", "freq=3", "directcopy", "hybrid-freq=3", "hybrid-freq=2", "calls_per_update=1"],
)
def test_a_refused_candidate_is_recomputed_thoroughly_without_a_wait_then_normal_again(options, monkeypatch):
    """Every normal candidate refused: each refresh after one is thorough (float64, products
    only) and accepted, the one after that normal again; nothing waits for the device."""
    counter, head, levels = refusing_steady_state(monkeypatch, ["normal"], **options)
    assert counter.total == 0, dict(counter.counts)
    assert len(levels) >= 2 and levels == (["normal", "thorough"] * STEPS)[:len(levels)]
    assert int(head.refresh_rejections) == levels.count("normal")  # every thorough one applied
    assert head.steps.thorough_refreshes == levels.count("thorough") and head.steps.exact_refreshes == 0


@pytest.mark.parametrize("freq", [1, 2])
def test_a_refused_thorough_candidate_makes_the_next_refresh_exact_which_waits(freq, monkeypatch):
    """Not vacuous: only the exact fallback after two refusals in a row waits, twice per exact refresh."""
    counter, head, levels = refusing_steady_state(monkeypatch, ["normal", "thorough"], freq=freq)
    assert "exact" in levels and levels == (["normal", "thorough", "exact"] * STEPS)[:len(levels)]
    exact = levels.count("exact")
    assert head.steps.exact_refreshes == exact and head.steps.thorough_refreshes == levels.count("thorough")
    assert counter.counts["aten::_linalg_eigh (eigh)"] == exact
    assert counter.counts["aten::_local_scalar_dense (read)"] == exact  # the exact rule's finiteness
    assert counter.total == 2 * exact, dict(counter.counts)


def test_public_refresh_and_diagnostics_read_the_device():
    head = DirectPredHead(DIM, refresh="iterative")
    head.update(torch.randn(32, DIM))
    with SyncCounter() as counter:
        head.refresh()
    assert counter.total == 1  # its returned bool
    with SyncCounter() as counter:
        head.diagnostics()
    assert counter.counts["aten::_linalg_eigh (eigh)"] > 0
