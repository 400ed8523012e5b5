"""StepSchedule and CounterMirror on their own: pure host state, no head."""

import copy
import pickle

import pytest
import torch

from directpred_plugin.schedule import CounterMirror, StepSchedule


def test_integer_pools_close_after_that_many_calls_and_refresh_every_freq_steps():
    schedule = StepSchedule(freq=2, calls_per_update=3)
    closes, due = [], []
    for _ in range(12):
        schedule.begin_call()
        full = schedule.add_call()
        closes.append(full)
        if full:
            due.append(schedule.close())
    assert closes == [False, False, True] * 4
    assert due == [False, True, False, True]
    assert schedule.steps == 4 and schedule.calls == 0


def test_auto_pool_closes_when_the_backward_pass_reaches_the_head():
    schedule = StepSchedule(freq=1, calls_per_update=None)
    assert not schedule.begin_call() and not schedule.add_call()
    assert not schedule.begin_call() and not schedule.add_call()  # second view, same step
    assert schedule.mark_backward()  # the first hook of the step's backward pass closes the pool
    assert schedule.close() and schedule.calls == 0 and schedule.steps == 1
    assert not schedule.mark_backward()  # later hooks of that backward pass: nothing left to close
    assert schedule.begin_call() and not schedule.pool_ended()  # the next call starts a new step


def test_integer_pools_are_not_closed_by_a_backward_pass():
    schedule = StepSchedule(freq=1, calls_per_update=2)
    schedule.add_call()
    assert not schedule.mark_backward() and schedule.calls == 1


def test_a_batch_folded_beside_the_open_pool_is_a_step_that_keeps_the_pool():
    schedule = StepSchedule(freq=1, calls_per_update=None)
    schedule.add_call()
    schedule.close(empties_pool=False)
    assert schedule.calls == 1 and schedule.steps == 1


def test_deferred_refresh_is_taken_once():
    schedule = StepSchedule(freq=1, calls_per_update=1)
    schedule.deferred = True
    assert schedule.take_deferred() and not schedule.take_deferred()


def test_state_round_trips_and_equal_states_save_equal():
    schedule = StepSchedule(freq=3, calls_per_update=None)
    schedule.add_call()
    schedule.mark_backward()
    state = schedule.state_dict()
    assert state == {"calls": 1, "steps": 0, "boundary": True, "deferred": False}
    other = StepSchedule(freq=3, calls_per_update=None)
    other.load_state_dict(state)
    assert other == schedule
    # a boundary after a closed pool changes nothing that follows, so it is not saved
    integer = StepSchedule(freq=3, calls_per_update=1)
    integer.mark_backward()
    assert integer.state_dict()["boundary"] is False


def test_mirror_reports_growth_one_exchange_late():
    mirror = CounterMirror()
    assert mirror.receive() == [0, 0]  # nothing in flight yet
    mirror.send(torch.tensor([0, 0]))
    assert mirror.receive() == [0, 0]
    mirror.send(torch.tensor([1, 0]))
    assert mirror.known == [0, 0]  # not before it is received
    assert mirror.receive() == [1, 0] and mirror.known == [1, 0]
    mirror.send(torch.tensor([1, 2]))
    assert mirror.receive() == [0, 2]
    assert mirror.receive() == [0, 0]


def test_mirror_values_in_flight_survive_saving_pickling_and_deepcopy():
    mirror = CounterMirror()
    mirror.send(torch.tensor([3, 1]))
    for restored in (pickle.loads(pickle.dumps(mirror)), copy.deepcopy(mirror)):
        assert restored.receive() == [3, 1]
    loaded = CounterMirror()
    loaded.load_state_dict(mirror.state_dict())
    assert loaded.receive() == [3, 1]
    assert mirror.receive() == [3, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mirror_copies_accelerator_counters_without_waiting():
    mirror = CounterMirror()
    mirror.send(torch.tensor([2, 5], device="cuda"))
    assert mirror.receive() == [2, 5]
