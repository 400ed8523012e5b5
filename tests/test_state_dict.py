"""What a head saves and loads: resume is bit-for-bit, old checkpoints migrate, others are refused.

``tests/data/head_v2_checkpoints.pt`` holds checkpoints saved by the version 2 head (and what
that head computed after them), so the migration is checked against the real old format.
"""

import collections
import copy
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import DIM, assert_same_state, call, make_batches, record_levels, refuse, snapshot
from _reference import ReferenceHead
from _spectra import DIM as SPECTRA_DIM
from _spectra import matrix_with_spectrum, stream_with_statistics
from directpred_plugin import DirectPredHead

V2_CHECKPOINTS = Path(__file__).parent / "data" / "head_v2_checkpoints.pt"


def reload(head, **options):
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    resumed = DirectPredHead(head.dim, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    return resumed


def relative_error(weight, reference):
    return float(np.linalg.norm(weight.detach().double().numpy() - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("calls_per_update", [1, 2, "auto"])
def test_resume_mid_run_is_identical_to_uninterrupted(trainable, calls_per_update):
    batches = make_batches(11)
    kwargs = dict(freq=2, trainable=trainable, calls_per_update=calls_per_update, center=True)

    def run(head, opt, zs):
        outs = []
        for z in zs:
            out = call(head, z)
            if opt is not None:
                opt.zero_grad()
            out.pow(2).mean().backward()
            if opt is not None:
                opt.step()
            outs.append(out.detach())
        return outs

    def optimizer(head):
        return torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9) if trainable else None

    straight = DirectPredHead(DIM, **kwargs)
    expected = run(straight, optimizer(straight), batches)
    first = DirectPredHead(DIM, **kwargs)
    opt1 = optimizer(first)
    outs = run(first, opt1, batches[:5])  # odd: mid-pool when calls_per_update=2
    resumed = reload(first, **kwargs)
    opt2 = optimizer(resumed)
    if trainable:
        opt2.load_state_dict(opt1.state_dict())
    outs += run(resumed, opt2, batches[5:])
    for a, b in zip(outs, expected):
        assert torch.equal(a, b)
    assert_same_state(snapshot(straight), snapshot(resumed))


@pytest.mark.parametrize("where", ["between-steps", "between-views"])
def test_auto_resume_between_steps_or_between_views_is_identical(where):
    steps = [make_batches(2, batch=12, seed=100 + s) for s in range(6)]

    def run(head, crops_per_step):
        outs = []
        for crops in crops_per_step:
            step = [call(head, z) for z in crops]
            sum(o.pow(2).mean() for o in step).backward()
            outs += [o.detach() for o in step]
        return outs

    options = dict(calls_per_update="auto", freq=2)
    straight = DirectPredHead(DIM, **options)
    expected = run(straight, steps)
    first = DirectPredHead(DIM, **options)
    got = run(first, steps[:3])
    if where == "between-views":  # saved after the first view of step 3, before its backward
        out = call(first, steps[3][0])
        got.append(out.detach())
    resumed = reload(first, **options)
    if where == "between-views":
        second = call(resumed, steps[3][1])
        (out.pow(2).mean() + second.pow(2).mean()).backward()
        got.append(second.detach())
        got += run(resumed, steps[4:])
    else:
        got += run(resumed, steps[3:])
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert_same_state(snapshot(straight), snapshot(resumed))


@pytest.mark.parametrize("save_after", [1, 2, 3, 4])
def test_resume_after_a_refused_refresh_continues_exactly(save_after, monkeypatch):
    """The fallback after a refusal (thorough, then exact) is decided on the host one step late:
    a resumed run must know the pending level and the level of the refresh still in flight."""
    refuse(monkeypatch, "normal", "thorough")
    levels = record_levels(monkeypatch)
    batches = [b.float() for b in stream_with_statistics(matrix_with_spectrum("power-law"), 6)]
    options = dict(refresh="iterative")
    straight = DirectPredHead(SPECTRA_DIM, **options)
    first = DirectPredHead(SPECTRA_DIM, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [call(straight, z) for z in batches]
        assert levels == ["normal", "thorough", "exact"] * 2
        got = [call(first, z) for z in batches[:save_after]]
        resumed = reload(first, **options)
        got += [call(resumed, z) for z in batches[save_after:]]
    assert levels[6:] == levels[:6]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert_same_state(snapshot(straight), snapshot(resumed))
    assert straight.refresher.get_extra_state() == resumed.refresher.get_extra_state()
    assert straight.refresher.exact_refreshes == resumed.refresher.exact_refreshes == 2
    assert straight.refresher.thorough_refreshes == resumed.refresher.thorough_refreshes == 2


@pytest.mark.parametrize("exact_next", [False, True])
def test_a_refresher_state_saved_before_the_thorough_level_loads(exact_next, monkeypatch):
    """``{"exact_next", "exact_refreshes"}`` (what state.py also writes for migrated version 1
    and 2 checkpoints): a pending exact refresh stays the next refresh, as it was."""
    levels = record_levels(monkeypatch)
    batches = [b.float() for b in stream_with_statistics(matrix_with_spectrum("power-law"), 2)]
    head = DirectPredHead(SPECTRA_DIM, refresh="iterative")
    call(head, batches[0])
    state = head.state_dict()
    state["refresher._extra_state"] = {"exact_next": exact_next, "exact_refreshes": 3}
    resumed = DirectPredHead(SPECTRA_DIM, refresh="iterative")
    resumed.load_state_dict(state)
    call(resumed, batches[1])
    assert levels == ["normal", "exact" if exact_next else "normal"]
    assert resumed.refresher.exact_refreshes == 3 + exact_next and resumed.refresher.thorough_refreshes == 0
    assert resumed.refresher.get_extra_state() == {"next_level": "normal", "last_level": levels[-1],
                                                   "exact_refreshes": 3 + exact_next, "thorough_refreshes": 0}
    state["refresher._extra_state"] = {**resumed.refresher.get_extra_state(), "next_level": "eigh"}
    with pytest.raises(ValueError, match="unknown refresh levels"):
        resumed.load_state_dict(state)


def test_resume_keeps_the_refresh_schedule_across_empty_and_skipped_steps():
    """freq counts every step, empty and skipped ones included; a resumed run must count them too."""
    bad = make_batches(1, seed=9)[0]
    bad[0, 0] = float("nan")
    sequence = [torch.empty(0, DIM), bad] + make_batches(4)
    straight, first = DirectPredHead(DIM, freq=3), DirectPredHead(DIM, freq=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [call(straight, z) for z in sequence]
        got = [call(first, z) for z in sequence[:2]]
        resumed = reload(first, freq=3)
        got += [call(resumed, z) for z in sequence[2:]]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert_same_state(snapshot(straight), snapshot(resumed))


def test_deepcopy_and_pickling_keep_the_whole_state():
    head = DirectPredHead(DIM, calls_per_update="auto", freq=2)
    for z in make_batches(3):
        call(head, z).sum().backward()
    for other in (copy.deepcopy(head), reload(head, calls_per_update="auto", freq=2)):
        assert_same_state(snapshot(head), snapshot(other))
        z = make_batches(1, seed=4)[0]
        assert torch.equal(call(copy.deepcopy(head), z), call(other, z))


@pytest.mark.parametrize("saved_with, loaded_with", [("iterative", "exact"), ("auto", "exact"),
                                                     ("exact", "iterative"), ("iterative", "auto")])
def test_resume_across_refresh_strategies(saved_with, loaded_with):
    batches = make_batches(6)
    first = DirectPredHead(DIM, refresh=saved_with)
    for z in batches[:3]:
        call(first, z)
    resumed = reload(first, refresh=loaded_with)  # strict: no missing or unexpected keys
    assert torch.equal(resumed.weight, first.weight) and torch.equal(resumed.corr, first.corr)
    ref = ReferenceHead(DIM)
    ref.run([z.double().numpy() for z in batches])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for z in batches[3:]:
            call(resumed, z)
    assert relative_error(resumed.weight, ref.W) <= 0.011


# ----------------------------------------------------------------------------- old versions
@pytest.mark.parametrize("name", ["default", "auto", "center", "hybrid"])
def test_version_2_checkpoints_load_and_continue_as_the_version_2_head_did(name):
    saved = torch.load(V2_CHECKPOINTS, weights_only=True)
    entry, batches = saved[name], saved["batches"]
    state = collections.OrderedDict(entry["state"])
    state._metadata = entry["metadata"]
    head = DirectPredHead(DIM, refresh="exact", **entry["options"])
    head.load_state_dict(state)  # strict
    opt = torch.optim.SGD(head.parameters(), lr=0.1) if head.trainable else None
    outs = []
    before_fold = {}  # the v2 head folded a step at the next step's first call, this one at its backward

    def step(zs):
        step_outs = [call(head, z) for z in zs]
        before_fold.update(corr=head.corr.clone(), weight=head.weight.detach().clone())
        if opt is not None:
            opt.zero_grad()
        sum(o.pow(2).mean() for o in step_outs).backward()
        if opt is not None:
            opt.step()
        return [o.detach() for o in step_outs]

    if name == "auto":  # saved between the views of step 3: its first view is in the pool
        second = call(head, batches[7])
        second.pow(2).mean().backward()
        outs.append(second.detach())
        ranges = range(4, 6)
    else:
        ranges = range(3, 6)
    for k in ranges:
        outs += step(batches[2 * k:2 * k + 2])
    # Equal up to rounding: the statistics are now normalised by a division (exact for subnormal
    # statistics too), and center keeps the covariance itself instead of F_hat next to mu.
    tol = dict(rtol=1e-4, atol=1e-4) if name == "center" else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(outs, entry["continued"]):
        torch.testing.assert_close(a, b, **tol)
    folds_at_backward = head.options.auto_steps
    final_corr = before_fold["corr"] if folds_at_backward else head.corr
    # a trainable W_p's last change is the optimizer's in both (the due refresh waits for the next step)
    final_weight = before_fold["weight"] if folds_at_backward and not head.trainable else head.weight.detach()
    torch.testing.assert_close(final_weight, entry["final_weight"], **tol)
    expected_corr = entry["final_corr"]
    if name == "center":
        mean = entry["final_mean"].double()
        torch.testing.assert_close(head.mean, entry["final_mean"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final_corr.double(), expected_corr.double() - torch.outer(mean, mean),
                                   rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(final_corr, expected_corr)  # the statistics themselves are bit for bit
    assert head.schedule.steps == int(head.num_updates)


def version_1_state_dict(head, refresh):
    """The state dict of the first release: no pools or refresh counters, a warm start (float64)
    and a fallback counter in the iterative strategy, version 1."""
    own = head.state_dict()
    names = {"weight": "weight", "corr": "stats.corr", "num_updates": "stats.num_updates",
             "num_skipped": "stats.num_skipped"}
    state = collections.OrderedDict((old, own[new].clone()) for old, new in names.items())
    warm = torch.randn(DIM, dtype=torch.float64)
    metadata = [("", {"version": 1}), ("refresher", {"version": 1})]
    if refresh == "iterative":
        state.update({"refresher.warm": warm, "refresher.fallbacks": torch.tensor(2)})
    elif refresh == "auto":
        state.update({"refresher.iterative.warm": warm, "refresher.iterative.fallbacks": torch.tensor(0)})
    state._metadata = collections.OrderedDict(metadata)
    return state


@pytest.mark.parametrize("old_refresh", ["iterative", "auto", "exact"])
@pytest.mark.parametrize("new_refresh", ["exact", "iterative"])
def test_version_1_checkpoint_with_a_warm_start_loads_and_continues_exactly(old_refresh, new_refresh):
    batches = make_batches(6)
    straight = DirectPredHead(DIM, refresh=new_refresh)
    for z in batches[:3]:
        call(straight, z)
    resumed = DirectPredHead(DIM, refresh=new_refresh)
    resumed.load_state_dict(version_1_state_dict(straight, old_refresh))
    assert int(resumed.refreshed_at) == 3  # W_p was refreshed at the last update
    for z in batches[3:]:
        assert torch.equal(call(resumed, z), call(straight, z))
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.corr, straight.corr)
    assert resumed.schedule.steps == straight.schedule.steps


@pytest.mark.parametrize("other, match", [(dict(variant="directcopy"), "variant='directcopy'"),
                                          (dict(dim=DIM + 2), f"dim={DIM + 2}")])
def test_checkpoint_of_another_variant_or_dim_is_refused_with_a_clear_error(other, match):
    saved = DirectPredHead(**{"dim": DIM, **other})
    call(saved, make_batches(1, dim=saved.dim)[0])
    head = DirectPredHead(DIM)
    before = snapshot(head)
    with pytest.raises(RuntimeError, match=match):
        head.load_state_dict(saved.state_dict())
    assert_same_state(before, snapshot(head))
    model = nn.Sequential(nn.Identity(), DirectPredHead(DIM))  # also inside a model (prefixed keys)
    with pytest.raises(RuntimeError, match=match):
        model.load_state_dict(nn.Sequential(nn.Identity(), saved).state_dict())


def test_state_dict_holds_the_statistics_the_counters_and_the_schedule():
    head = DirectPredHead(DIM, calls_per_update="auto")
    for z in make_batches(3):
        call(head, z).sum().backward()
    state = head.state_dict()
    assert int(state["stats.num_updates"]) == 3  # each backward pass folded its step
    assert torch.equal(state["stats.corr"], head.corr) and torch.equal(state["weight"], head.weight)
    assert state["_extra_state"]["schedule"] == {"calls": 0, "steps": 3, "boundary": False, "deferred": False}
    call(head, make_batches(1)[0])  # a call without its backward pass: the pool is open and saved
    assert head.state_dict()["_extra_state"]["schedule"] == {"calls": 1, "steps": 3, "boundary": False,
                                                             "deferred": False}
    assert state._metadata[""]["version"] == 4
