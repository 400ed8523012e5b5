"""What a head saves and loads: resume is bit-for-bit; checkpoints of another configuration or
of an earlier development format are refused, naming why."""

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import DIM, assert_same_state, call, make_batches, record_levels, refuse, snapshot
from _reference import ReferenceHead
from _spectra import DIM as SPECTRA_DIM
from _spectra import matrix_with_spectrum, stream_with_statistics
from directpred_plugin import DirectPredHead


def reload(head, **options):
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    resumed = DirectPredHead(head.dim, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    return resumed


def relative_error(weight, reference):
    return float(np.linalg.norm(weight.detach().double().numpy() - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("trainable, calls_per_update", [(False, 1), (False, 2), (False, "auto"), (True, "auto")])
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
    options = dict(refresh="iterative", calls_per_update=1)
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
    assert straight.steps.state() == resumed.steps.state()
    assert straight.steps.exact_refreshes == resumed.steps.exact_refreshes == 2
    assert straight.steps.thorough_refreshes == resumed.steps.thorough_refreshes == 2


def test_resume_keeps_the_refresh_schedule_across_empty_and_skipped_steps():
    """freq counts every step, empty and skipped ones included; a resumed run must count them too."""
    bad = make_batches(1, seed=9)[0]
    bad[0, 0] = float("nan")
    sequence = [torch.empty(0, DIM), bad] + make_batches(4)
    straight, first = DirectPredHead(DIM, freq=3, calls_per_update=1), DirectPredHead(DIM, freq=3, calls_per_update=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [call(straight, z) for z in sequence]
        got = [call(first, z) for z in sequence[:2]]
        resumed = reload(first, freq=3, calls_per_update=1)
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
    first = DirectPredHead(DIM, refresh=saved_with, calls_per_update=1)
    for z in batches[:3]:
        call(first, z)
    resumed = reload(first, refresh=loaded_with, calls_per_update=1)  # strict: no missing or unexpected keys
    assert torch.equal(resumed.weight, first.weight) and torch.equal(resumed.corr, first.corr)
    ref = ReferenceHead(DIM)
    ref.run([z.double().numpy() for z in batches])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for z in batches[3:]:
            call(resumed, z)
    assert relative_error(resumed.weight, ref.W) <= 0.011


# ------------------------------------------------------------------------ other formats
EARLIER_FORMATS = {  # keys of the development formats before this one, as they were saved
    "flat counters": {"weight": torch.eye(DIM), "corr": torch.eye(DIM), "num_updates": torch.tensor(3),
                      "num_skipped": torch.tensor(0)},
    "owners": {"weight": torch.eye(DIM), "stats.corr": torch.eye(DIM), "stats.num_updates": torch.tensor(3),
               "refresher.refreshed_at": torch.tensor(3)},
    "dict extra state": {"weight": torch.eye(DIM), "corr": torch.eye(DIM),
                         "_extra_state": {"schedule": {"calls": 0, "steps": 3}}},
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", EARLIER_FORMATS)
def test_a_checkpoint_of_an_earlier_development_format_is_refused_naming_it(name, strict):
    head = DirectPredHead(DIM)
    before = snapshot(head)
    with pytest.raises(RuntimeError, match="development version of DirectPredHead"):
        head.load_state_dict(dict(EARLIER_FORMATS[name]), strict=strict)
    assert_same_state(before, snapshot(head))


def test_a_tensor_state_of_another_format_number_is_refused_naming_both():
    head = DirectPredHead(DIM)
    state = head.state_dict()
    earlier = state["_extra_state"].clone()
    earlier[0] = 5  # the format with a flag for a backward pass seen, one number longer
    before = snapshot(head)
    with pytest.raises(RuntimeError, match="saved in format 5, this DirectPredHead reads format 6"):
        head.load_state_dict({**state, "_extra_state": earlier})
    assert_same_state(before, snapshot(head))


def test_unknown_refresh_levels_in_a_checkpoint_are_refused():
    head = DirectPredHead(DIM, refresh="iterative")
    call(head, make_batches(1)[0]).sum().backward()
    state = head.state_dict()
    saved = state["_extra_state"].clone()
    saved[4 + 2] = 7  # the header's four numbers, then calls, steps, next_level
    state["_extra_state"] = saved
    with pytest.raises(ValueError, match="unknown refresh levels"):
        DirectPredHead(DIM, refresh="iterative").load_state_dict(state)


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


def test_state_dict_holds_the_statistics_and_one_tensor_of_counters_and_schedule():
    head = DirectPredHead(DIM)
    for z in make_batches(3):
        call(head, z).sum().backward()  # leaf inputs, no optimizer: each backward pass ends a step
    state = head.state_dict()
    assert list(state) == ["weight", "corr", "_extra_state"]
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert torch.equal(state["corr"], head.corr) and torch.equal(state["weight"], head.weight)
    assert state["_extra_state"].dtype == torch.float64 and state["_extra_state"].device.type == "cpu"
    assert state._metadata[""]["version"] == 6
    call(head, make_batches(1, seed=3)[0])  # a call without its backward pass: the pool is open and saved
    open_pool = head.state_dict()["_extra_state"]
    assert open_pool.numel() == state["_extra_state"].numel() + 1 + DIM + DIM * DIM  # rows, total, outer
    resumed = DirectPredHead(DIM)
    resumed.load_state_dict({**state, "_extra_state": open_pool})  # a plain dict: no metadata needed
    assert (int(resumed.num_updates), resumed.steps.steps, resumed.steps.calls) == (3, 3, 1)
    assert_same_state(snapshot(head), snapshot(resumed))
    with_center = DirectPredHead(DIM, center=True)
    call(with_center, make_batches(1)[0]).sum().backward()
    assert list(with_center.state_dict()) == ["weight", "corr", "mean", "_extra_state"]
