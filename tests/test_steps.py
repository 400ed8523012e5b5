"""``Steps``, the host side of a head: pools and steps, refresh levels, device counters one step
late, the copies of ``W_p`` each call uses and their records for checkpoint recomputation, and
the CUDA side stream the end of a step runs on.

Each part is checked on a bare :class:`~directpred_plugin.steps.Steps` (pure host state) and
through a :class:`~directpred_plugin.DirectPredHead`. The CUDA ordering is checked with
stand-in streams on the CPU.
"""

import contextlib
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from _helpers import DIM, call, make_batches
from directpred_plugin import DirectPredHead
from directpred_plugin.steps import EXACT, NORMAL, THOROUGH, Steps, linear


# ============================================================== Steps on its own
# ---------------------------------------------------------------- pools and steps
def test_integer_pools_close_after_that_many_calls_and_refresh_every_freq_steps():
    steps = Steps(freq=2, calls_per_update=3)
    assert not steps.auto and steps.watching()  # an integer pool watches nothing
    closes, due = [], []
    for _ in range(12):
        full = steps.add_call()
        closes.append(full)
        if full:
            due.append(steps.close())
    assert closes == [False, False, True] * 4
    assert due == [False, True, False, True]
    assert steps.steps == 4 and steps.calls == 0


def test_integer_pools_are_not_closed_by_a_backward_pass_nor_ended_by_an_optimizer_step():
    steps = Steps(freq=1, calls_per_update=2)
    steps.add_call()
    assert not steps.backward_reached() and steps.calls == 1
    assert not steps.waits_for_update() and not steps.pool_ended(stepped=set())


def test_an_auto_pool_with_nothing_watched_is_ended_by_the_backward_pass():
    steps = Steps(freq=1, calls_per_update=None)
    assert steps.auto and not steps.watching()  # not known before the pool's first call
    steps.watch([])  # leaf inputs: no parameter upstream
    assert not steps.add_call() and not steps.add_call()  # two views, one step
    assert steps.backward_reached()  # the first hook of the step's backward pass ends the step
    assert steps.close() and steps.calls == 0 and steps.steps == 1
    assert not steps.watching()  # the next pool learns its own parameters
    assert not steps.backward_reached()  # later hooks of that backward pass: nothing left to end
    assert not steps.waits_for_update() and not steps.pool_ended(stepped=set())


def test_an_auto_pool_with_watched_parameters_waits_for_their_update():
    steps = Steps(freq=1, calls_per_update=None)
    parameter, other = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    steps.watch([parameter])
    steps.add_call()
    assert steps.waits_for_update()  # from the first call on: a loss may never reach the head's output
    assert not steps.backward_reached()  # the backward pass alone does not end it
    assert steps.waits_for_update()
    assert not steps.pool_ended()  # gradient accumulation: more backward passes may come
    assert not steps.pool_ended(stepped={id(other)})  # another optimizer's step
    assert steps.pool_ended(stepped={id(other), id(parameter)})  # torch's optimizer hook (fused: no version bump)
    with torch.no_grad():
        parameter.sub_(0.5)  # an update other than torch.optim's, seen at the next call
    assert steps.pool_ended()
    steps.close()
    assert not steps.waits_for_update() and not steps.watching()


def test_a_trainable_weight_is_ended_by_its_own_optimizer_only():
    steps = Steps(freq=2, calls_per_update=None)
    upstream, weight = torch.zeros(3, requires_grad=True), torch.eye(2, requires_grad=True)
    steps.watch([upstream], weight)
    steps.add_call()
    assert not steps.pool_ended(stepped={id(upstream)})  # the backbone's optimizer: W_p's gradient is unused yet
    assert steps.pool_ended(stepped={id(weight)})
    with torch.no_grad():
        weight.add_(1.0)
    assert steps.pool_ended()


def test_a_batch_folded_beside_the_open_pool_is_a_step_that_keeps_the_pool():
    steps = Steps(freq=1, calls_per_update=None)
    parameter = torch.zeros(3, requires_grad=True)
    steps.watch([parameter])
    steps.add_call()
    steps.backward_reached()
    assert steps.close(empties_pool=False)
    assert steps.calls == 1 and steps.steps == 1
    assert steps.watching() and steps.waits_for_update()


def test_reset_forgets_everything():
    steps = Steps(freq=1, calls_per_update=None)
    steps.watch([])
    steps.add_call()
    steps.backward_reached()
    steps.close()
    steps.refresh_level(True)
    steps.rejection_learned()
    steps.send_counters(torch.tensor([1, 2]))
    steps.receive_counters()
    steps.reset()
    assert steps.state() == Steps(freq=1, calls_per_update=None).state()


# ---------------------------------------------------------------- refresh levels
def test_a_refusal_climbs_to_the_thorough_then_the_exact_level_and_each_refresh_after_is_normal():
    steps = Steps(freq=1, calls_per_update=1)
    assert steps.refresh_level(True) == NORMAL
    steps.rejection_learned()  # the normal candidate was refused
    assert steps.next_level == THOROUGH
    assert steps.refresh_level(True) == THOROUGH and steps.last_level == THOROUGH
    steps.rejection_learned()  # the thorough candidate too
    assert steps.refresh_level(True) == EXACT
    steps.rejection_learned()  # even the exact rule failed: stay exact
    assert steps.next_level == EXACT
    assert steps.refresh_level(True) == EXACT
    assert steps.refresh_level(True) == NORMAL  # no refusal learned: normal again
    assert (steps.thorough_refreshes, steps.exact_refreshes) == (1, 2)


def test_an_exact_refresh_has_no_level_to_climb():
    steps = Steps(freq=1, calls_per_update=1)
    steps.refresh_level(False)
    steps.rejection_learned()
    assert steps.refresh_level(False) == NORMAL  # the refresh already is the exact rule
    assert (steps.thorough_refreshes, steps.exact_refreshes) == (0, 0)
    assert steps.next_level == NORMAL


# ---------------------------------------------------------------- saved state
def test_state_round_trips_and_equal_states_save_equal():
    steps = Steps(freq=3, calls_per_update=None)
    steps.watch([])
    steps.add_call()
    steps.add_call()
    steps.refresh_level(True)
    steps.rejection_learned()
    steps.send_counters(torch.tensor([4, 1]))
    state = steps.state()
    assert len(state) == Steps.STATE_SIZE and all(isinstance(v, int) for v in state)
    other = Steps(freq=3, calls_per_update=None)
    other.load_state(state)
    assert other.state() == state
    assert (other.calls, other.steps, other.next_level, other.last_level) == (2, 0, THOROUGH, NORMAL)
    assert other.receive_counters() == [4, 1]
    # a backward pass reaching no open pool changes nothing that follows, and saves nothing
    integer = Steps(freq=3, calls_per_update=1)
    integer.backward_reached()
    assert integer.state() == Steps(freq=3, calls_per_update=1).state()


def test_a_loaded_auto_pool_learns_its_watched_parameters_again():
    steps = Steps(freq=1, calls_per_update=None)
    steps.watch([torch.zeros(2, requires_grad=True)])
    steps.add_call()
    steps.backward_reached()
    loaded = Steps(freq=1, calls_per_update=None)
    loaded.load_state(steps.state())
    assert loaded.calls == 1
    assert not loaded.watching()  # parameters are not saved: the next call watches them again
    assert not loaded.waits_for_update() and not loaded.pool_ended(stepped=set())


def test_unknown_refresh_levels_are_refused():
    state = Steps(freq=1, calls_per_update=1).state()
    state[3] = 7  # next_level
    with pytest.raises(ValueError, match="unknown refresh levels"):
        Steps(freq=1, calls_per_update=1).load_state(state)


# ---------------------------------------------------------------- device counters, one step late
def test_counters_arrive_one_exchange_late():
    steps = Steps(freq=1, calls_per_update=1)
    assert steps.peek_counters() is None and steps.receive_counters() == [0, 0]  # nothing in flight yet
    steps.send_counters(torch.tensor([0, 0]))
    assert steps.receive_counters() == [0, 0]
    steps.send_counters(torch.tensor([1, 0]))
    assert steps.known == [0, 0]  # not before it is received
    assert steps.peek_counters() == [1, 0] and steps.peek_counters() == [1, 0]  # a peek consumes nothing
    assert steps.known == [0, 0]
    assert steps.receive_counters() == [1, 0] and steps.known == [1, 0]
    steps.send_counters(torch.tensor([1, 2]))
    assert steps.receive_counters() == [0, 2]
    assert steps.receive_counters() == [0, 0]


def test_a_peek_reads_the_counters_in_flight_once():
    """The first peek reads the host copy (on the CPU the sent tensor itself); later peeks and the
    receive return those values without reading again."""
    steps = Steps(freq=1, calls_per_update=1)
    sent = torch.tensor([1, 0])
    steps.send_counters(sent)
    assert steps.peek_counters() == [1, 0]
    sent.fill_(9)  # read once: a later write is not seen
    assert steps.receive_counters() == [1, 0]


def test_counters_in_flight_survive_saving_pickling_and_deepcopy():
    steps = Steps(freq=2, calls_per_update=None)
    steps.send_counters(torch.tensor([1, 0]))
    steps.receive_counters()
    steps.send_counters(torch.tensor([3, 1]))
    restored = [pickle.loads(pickle.dumps(steps)), copy.deepcopy(steps)]
    loaded = Steps(freq=2, calls_per_update=None)
    loaded.load_state(steps.state())
    for other in restored + [loaded]:
        assert other.known == [1, 0]
        assert other.receive_counters() == [2, 1] and other.known == [3, 1]
    assert steps.receive_counters() == [2, 1]  # the original still has them too
    assert all(other.freq == 2 and other.auto for other in restored)


def test_pickling_and_deepcopy_keep_the_saved_state_and_leave_the_rest_with_the_original():
    steps = Steps(freq=3, calls_per_update=None)
    parameter = torch.zeros(2, requires_grad=True)
    steps.watch([parameter])
    steps.add_call()
    weight = torch.eye(4)
    steps.weight_for_call(weight, False, torch.float32)
    z = torch.randn(5, 4, requires_grad=True)
    out = linear(z, weight)
    steps.record(out, weight.clone(), lambda: None)
    for other in (pickle.loads(pickle.dumps(steps)), copy.deepcopy(steps)):
        assert other.state() == steps.state() and other.calls == 1
        assert not other.watching() and other._records == [] and other._copy is None
        with pytest.raises(RuntimeError, match="no call of this head is waiting"):
            other.weight_for_recomputation(weight, False, torch.float32)
    assert steps.watching() and torch.equal(steps.weight_for_recomputation(weight, False, torch.float32), weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_accelerator_counters_are_copied_to_pinned_memory_and_read_without_waiting():
    steps = Steps(freq=1, calls_per_update=1)
    steps.send_counters(torch.tensor([2, 5], device="cuda"))
    assert steps._host.is_pinned() and steps._event is not None
    assert steps.receive_counters() == [2, 5]


# ---------------------------------------------------------------- W_p for each call
def test_a_buffer_weight_is_copied_and_cast_once_per_change_of_the_tensor():
    weight = torch.randn(4, 4)
    steps = Steps(freq=1, calls_per_update=1)
    first, snapshot = steps.weight_for_call(weight, False, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.to(torch.bfloat16))
    assert snapshot.dtype == weight.dtype and torch.equal(snapshot, weight) and snapshot is not weight
    again, same = steps.weight_for_call(weight, False, torch.bfloat16)  # the second view of the step
    assert again is first and same is snapshot
    full, _ = steps.weight_for_call(weight, False, torch.float32)
    assert full is snapshot and full is not weight  # a copy: a refresh writes W_p in place
    weight.mul_(2)  # a refresh
    second, new_snapshot = steps.weight_for_call(weight, False, torch.bfloat16)
    assert second is not first and new_snapshot is not snapshot
    assert torch.equal(second, weight.to(torch.bfloat16)) and torch.equal(new_snapshot, weight)
    assert torch.equal(snapshot * 2, weight)  # the old copy kept the old values
    steps.drop_copies()  # a load or a move
    assert steps.weight_for_call(weight, False, torch.bfloat16)[0] is not second
    other = weight.clone()  # another tensor (a load that replaced it)
    assert steps.weight_for_call(other, False, torch.float32)[1] is not new_snapshot


def test_a_trainable_weight_is_a_differentiable_copy_per_call():
    weight = torch.randn(4, 4, requires_grad=True)
    steps = Steps(freq=2, calls_per_update=None)
    first, snapshot = steps.weight_for_call(weight, True, torch.bfloat16)
    assert first.requires_grad and first.dtype == weight.dtype  # cast by the call, so the gradient flows
    assert not snapshot.requires_grad and torch.equal(snapshot, weight)
    second, _ = steps.weight_for_call(weight, True, torch.bfloat16)
    assert second is not first
    with torch.no_grad():
        weight.add_(1.0)  # an in-place change after the call does not reach its copy
    assert torch.equal(first + 1.0, weight)
    z = torch.randn(3, 4)
    linear(z, first).sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(3, 4).T @ z)


def _pending_call(steps, weight, trainable=False, reached=None):
    """A training call as the head makes it: its W_p, its output, and the record of the two."""
    used, snapshot = steps.weight_for_call(weight, trainable, torch.float32)
    z = torch.randn(5, weight.shape[0], requires_grad=True)
    out = linear(z, used)
    steps.record(out, snapshot, reached or (lambda: None))
    return out


def test_a_recomputation_uses_the_w_p_of_the_pending_calls():
    weight = torch.randn(4, 4)
    steps = Steps(freq=1, calls_per_update=1)
    with pytest.raises(RuntimeError, match="no call of this head is waiting"):
        steps.weight_for_recomputation(weight, False, torch.float32)
    used = weight.clone()
    outs = [_pending_call(steps, weight) for _ in range(2)]
    weight.mul_(3)  # a refresh after the calls, before their backward pass
    recomputed = steps.weight_for_recomputation(weight, False, torch.bfloat16)
    assert recomputed.dtype == torch.bfloat16 and torch.equal(recomputed, used.to(torch.bfloat16))
    assert torch.equal(steps.weight_for_recomputation(weight, False, torch.float32), used)
    sum(out.sum() for out in outs).backward()  # their backward pass ran: nothing is pending
    with pytest.raises(RuntimeError, match="no call of this head is waiting"):
        steps.weight_for_recomputation(weight, False, torch.float32)


def test_a_record_lives_as_long_as_the_graph_of_its_call():
    weight = torch.randn(4, 4)
    steps = Steps(freq=1, calls_per_update=1)
    out = _pending_call(steps, weight)
    assert torch.equal(steps.weight_for_recomputation(weight, False, torch.float32), weight)
    del out  # the graph is gone: no backward pass can recompute that call
    with pytest.raises(RuntimeError, match="no call of this head is waiting"):
        steps.weight_for_recomputation(weight, False, torch.float32)


def test_the_backward_pass_reaching_a_call_is_reported_once_per_call():
    steps = Steps(freq=1, calls_per_update=1)
    reached = []
    outs = [_pending_call(steps, torch.eye(4), reached=lambda i=i: reached.append(i)) for i in range(2)]
    outs[1].sum().backward()
    assert reached == [1]
    outs[0].sum().backward()
    assert reached == [1, 0]


def test_pending_calls_with_different_w_p_values_make_the_recomputation_raise():
    weight = torch.randn(4, 4)
    steps = Steps(freq=1, calls_per_update=1)
    outs = [_pending_call(steps, weight)]
    weight.mul_(2)  # a refresh between a forward and another one, both backward passes pending
    outs.append(_pending_call(steps, weight))
    with pytest.raises(RuntimeError, match="W_p changed between calls whose backward passes are still pending"):
        steps.weight_for_recomputation(weight, False, torch.float32)
    outs[0].sum().backward()  # the older call's backward pass ran: the rest agree again
    assert torch.equal(steps.weight_for_recomputation(weight, False, torch.float32), weight)


def test_a_buffer_weight_rewritten_with_equal_values_keeps_the_step_recomputable():
    """DDP's buffer broadcast, a deepcopy: W_p's tensor version moves, its values do not."""
    weight = torch.randn(4, 4)
    steps = Steps(freq=1, calls_per_update=None)
    outs = [_pending_call(steps, weight)]
    before = steps._copy[1]
    weight.copy_(weight.clone())  # what a broadcast of the same values does
    outs.append(_pending_call(steps, weight))
    assert steps._copy[1] is not before  # a new copy, of equal values
    assert torch.equal(steps.weight_for_recomputation(weight, False, torch.float32), weight)


def _trainable_recomputation(moved_by):
    weight = torch.randn(4, 4, requires_grad=True, generator=torch.Generator().manual_seed(2))
    steps = Steps(freq=2, calls_per_update=None)
    used = weight.detach().clone()
    out = _pending_call(steps, weight, trainable=True)
    with torch.no_grad():
        weight.add_(moved_by)  # moved after the call (what the recomputation must not see)
    recomputed = steps.weight_for_recomputation(weight, True, torch.bfloat16)
    return weight, used, recomputed, out


def test_a_trainable_weight_recomputed_has_the_gradient_to_the_parameter():
    weight, used, recomputed, _ = _trainable_recomputation(1.0)
    assert recomputed.requires_grad and recomputed.dtype == weight.dtype
    torch.testing.assert_close(recomputed.detach(), used)
    z = torch.randn(3, 4)
    (z @ recomputed.T).sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(3, 4).T @ z)


@pytest.mark.parametrize("moved_by", [0.0, 1.0])
def test_a_trainable_weight_recomputed_has_exactly_the_values_of_the_forward_pass(moved_by):
    """``weight_for_recomputation``: "the values of the forward pass" (bit for bit, so that the
    recomputation is exact), also when the parameter moved in place after the call."""
    _, used, recomputed, _ = _trainable_recomputation(moved_by)
    assert torch.equal(recomputed.detach(), used), (recomputed.detach() - used).abs().max()


def test_a_trainable_weight_moved_between_pending_calls_makes_the_step_unrecomputable():
    weight = torch.randn(4, 4, requires_grad=True)
    steps = Steps(freq=2, calls_per_update=None)
    outs = [_pending_call(steps, weight, trainable=True)]
    with torch.no_grad():
        weight.sub_(0.1)  # an optimizer step between two calls whose backward passes are pending
    outs.append(_pending_call(steps, weight, trainable=True))
    with pytest.raises(RuntimeError, match="W_p changed between calls"):
        steps.weight_for_recomputation(weight, True, torch.float32)


# ---------------------------------------------------------------- where the step's end runs
def test_off_cuda_the_work_runs_inline():
    steps = Steps(freq=1, calls_per_update=1)
    assert steps.run_beside_backward(torch.device("cpu"), lambda: 7) == 7
    assert steps._streams == {}


class _Event:
    def __init__(self, log, name):
        self.log, self.name = log, name


class _Stream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")

    def record_event(self):
        self.log.append(f"{self.name} records")
        return _Event(self.log, self.name)

    def wait_event(self, event):
        self.log.append(f"{self.name} waits for {event.name}'s event")


def _stand_in_cuda(monkeypatch, log):
    caller = _Stream(log, "caller")
    current = [caller]
    created = []

    def new_stream(device=None):
        created.append(device)
        return _Stream(log, "side")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "Stream", new_stream)

    @contextlib.contextmanager
    def stream(s):
        current[0] = s
        try:
            yield
        finally:
            current[0] = caller

    monkeypatch.setattr(torch.cuda, "stream", stream)
    return current, created


def test_inside_backward_the_caller_waits_for_the_side_stream_when_the_backward_pass_ends(monkeypatch):
    log = []
    current, _ = _stand_in_cuda(monkeypatch, log)
    steps = Steps(freq=1, calls_per_update=None)
    x = torch.randn(4, 3, requires_grad=True)
    hidden = x * 2
    out = hidden * 3
    results = []

    def work():
        log.append(f"work on {current[0].name}")
        return "done"

    out.register_hook(lambda grad: results.append(steps.run_beside_backward(torch.device("cuda", 0), work)))
    hidden.register_hook(lambda grad: log.append("rest of the backward pass"))
    out.sum().backward()
    assert log == ["side waits for caller", "work on side", "side records", "rest of the backward pass",
                   "caller waits for side's event"]
    assert results == ["done"] and set(steps._streams) == {0}


def test_outside_backward_the_caller_waits_at_once(monkeypatch):
    log = []
    _stand_in_cuda(monkeypatch, log)
    steps = Steps(freq=1, calls_per_update=None)
    steps.run_beside_backward(torch.device("cuda", 0), lambda: log.append("work"))
    log.append("after")
    assert log == ["side waits for caller", "work", "side records", "caller waits for side's event", "after"]


def test_one_side_stream_per_device_reused_across_steps(monkeypatch):
    log = []
    _, created = _stand_in_cuda(monkeypatch, log)
    steps = Steps(freq=1, calls_per_update=None)
    for index in (0, 1, 0, 1, 0):
        steps.run_beside_backward(torch.device("cuda", index), lambda: None)
    assert len(created) == 2 and set(steps._streams) == {0, 1}
    for other in (copy.deepcopy(steps), pickle.loads(pickle.dumps(steps))):
        assert other._streams == {}  # streams stay with the original


# ============================================================== Steps through a head
def test_integer_pools_through_a_head():
    head = DirectPredHead(DIM, calls_per_update=3, freq=2)
    assert head.calls_per_update == 3
    batches = make_batches(12, dim=DIM)
    for index, z in enumerate(batches, start=1):
        call(head, z)
        assert head.steps.calls == index % 3 and head.steps.steps == index // 3
        assert int(head.num_updates) == index // 3
        assert int(head.refreshed_at) == index // 6 * 6 // 3  # every second step refreshes
    assert head.diagnostics()["num_steps"] == 4


def test_with_leaf_inputs_the_backward_pass_ends_the_step():
    head = DirectPredHead(DIM)
    assert head.calls_per_update == "auto"
    for step, (z0, z1) in enumerate(zip(make_batches(3, dim=DIM), make_batches(3, dim=DIM, seed=1)), start=1):
        z0.requires_grad_(True), z1.requires_grad_(True)
        loss = head(z0).sum() + head(z1).sum()  # two views, one step
        assert head.steps.calls == 2 and int(head.num_updates) == step - 1
        loss.backward()
        assert head.steps.calls == 0 and head.steps.steps == step and int(head.num_updates) == step
        assert int(head.refreshed_at) == step


def _embedder(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(12, DIM)


def test_with_parameters_upstream_the_optimizer_step_ends_the_step():
    head = DirectPredHead(DIM)
    embed = _embedder()
    optimizer = torch.optim.SGD(embed.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 3):
        for micro in range(3):  # gradient accumulation: three backward passes, one step
            head(embed(torch.randn(16, 12, generator=gen))).sum().backward()
            assert head.steps.calls == micro + 1
            assert head.steps.steps == step - 1 and int(head.num_updates) == step - 1
        weight = head.weight.clone()
        optimizer.step()  # torch's optimizer post-hook ends the step now, not at the next call
        assert head.steps.calls == 0 and head.steps.steps == step and int(head.num_updates) == step
        assert not torch.equal(head.weight, weight)


def test_a_parameter_update_other_than_torch_optim_ends_the_step_at_the_next_call():
    head = DirectPredHead(DIM)
    embed = _embedder()
    x = torch.randn(16, 12)
    head(embed(x)).sum().backward()
    assert head.steps.steps == 0
    with torch.no_grad():
        for parameter in embed.parameters():
            parameter.sub_(0.01 * parameter.grad)  # a hand-written SGD step
    assert head.steps.steps == 0  # nothing told the head yet
    head(embed(x))
    assert head.steps.steps == 1 and int(head.num_updates) == 1 and head.steps.calls == 1


def test_update_is_a_call_of_an_integer_pool_and_a_step_of_its_own_beside_an_open_auto_pool():
    batches = make_batches(4, dim=DIM)
    integer = DirectPredHead(DIM, calls_per_update=2)
    integer.update(batches[0])
    assert integer.steps.calls == 1 and int(integer.num_updates) == 0
    call(integer, batches[1])
    assert integer.steps.calls == 0 and integer.steps.steps == 1 and int(integer.num_updates) == 1
    head = DirectPredHead(DIM)
    out = call(head, batches[2])  # an open pool, waiting for its backward pass
    head.update(batches[3])
    assert head.steps.calls == 1 and head.steps.steps == 1 and int(head.num_updates) == 1
    out.sum().backward()  # the pool is still there and ends its own step
    assert head.steps.calls == 0 and head.steps.steps == 2 and int(head.num_updates) == 2


def test_an_input_no_backward_pass_can_reach_is_a_step_of_its_own():
    head = DirectPredHead(DIM)
    for index, z in enumerate(make_batches(3, dim=DIM), start=1):
        head(z)  # requires no grad: nothing can end a pool later
        assert head.steps.calls == 0 and head.steps.steps == index and int(head.num_updates) == index


def test_a_trainable_head_needs_auto_and_its_step_ends_at_the_optimizer_step_even_with_leaf_inputs():
    with pytest.raises(ValueError, match="trainable=True needs calls_per_update='auto'"):
        DirectPredHead(DIM, trainable=True, freq=2, calls_per_update=2)
    head = DirectPredHead(DIM, trainable=True, freq=2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    z = make_batches(1, dim=DIM)[0].requires_grad_(True)
    head(z).sum().backward()
    assert head.steps.calls == 1 and int(head.num_updates) == 0  # W_p is watched: it waits
    optimizer.step()
    assert head.steps.calls == 0 and int(head.num_updates) == 1


class _CopyCounter(TorchDispatchMode):
    """Counts copies (``clone``, ``_to_copy``) of a ``dim x dim`` tensor by target dtype."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.copies = dim, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default) and out.shape == (self.dim,) * 2:
            self.copies.append((func.__name__.split(".")[0], out.dtype))
        return out


def test_through_a_head_w_p_is_copied_and_cast_once_per_change_of_the_weight_not_per_call():
    head = DirectPredHead(DIM, freq=2)  # refreshes (writes W_p) after every second step
    embed = _embedder()
    optimizer = torch.optim.SGD(embed.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(5)
    per_step = []
    for _ in range(4):
        with _CopyCounter(DIM) as counter:
            outs = [head(embed(torch.randn(16, 12, generator=gen)).bfloat16()) for _ in range(3)]
        per_step.append(counter.copies)
        sum(out.float().sum() for out in outs).backward()
        optimizer.step()
    copied = [("clone", torch.float32), ("_to_copy", torch.bfloat16)]
    # step 1 copies the initial W_p; the refresh after step 2 changes it; steps 2 and 4 reuse
    assert per_step == [copied, [], copied, []]
    assert int(head.num_updates) == 4 and int(head.refreshed_at) == 4


def test_through_a_head_a_trainable_w_p_is_a_differentiable_copy_per_call():
    head = DirectPredHead(DIM, trainable=True, freq=2)
    z0, z1 = (z.requires_grad_(True) for z in make_batches(2, dim=DIM))
    with _CopyCounter(DIM) as first:
        p0 = head(z0)
    with _CopyCounter(DIM) as second:
        p1 = head(z1)
    # each call its own differentiable copy; the record's copy only once per change of W_p
    assert first.copies == [("clone", torch.float32)] * 2 and second.copies == [("clone", torch.float32)]
    assert p0.grad_fn is not None and p1.grad_fn is not None
    (p0.sum() + p1.sum()).backward()
    ones = torch.ones(len(z0), DIM)
    torch.testing.assert_close(head.weight.grad, ones.T @ z0.detach() + ones.T @ z1.detach())
    torch.testing.assert_close(z0.grad, ones @ head.weight.detach())


def test_through_a_head_a_recomputation_uses_the_w_p_of_its_forward_pass():
    """The call folds and refreshes at once (one call per update): the recomputation inside the
    backward pass must use the identity it multiplied by, not the refreshed W_p."""
    head = DirectPredHead(DIM, calls_per_update=1)
    z = make_batches(1, dim=DIM)[0].requires_grad_(True)
    out = checkpoint(head, z, use_reentrant=False)
    assert not torch.equal(head.weight, torch.eye(DIM))  # refreshed since
    gradient = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(gradient)
    torch.testing.assert_close(z.grad, gradient)  # d(z @ I^T)/dz


def test_through_a_head_pending_calls_with_different_w_p_make_the_recomputation_raise():
    head = DirectPredHead(DIM, calls_per_update=1)
    z0, z1 = (z.requires_grad_(True) for z in make_batches(2, dim=DIM))
    outs = [checkpoint(head, z, use_reentrant=False) for z in (z0, z1)]  # a refresh between them
    with pytest.raises(RuntimeError, match="W_p changed between calls whose backward passes are still pending"):
        (outs[0].sum() + outs[1].sum()).backward()


def test_through_a_head_a_step_with_equal_w_p_recomputes_exactly():
    head = DirectPredHead(DIM)  # "auto": both views use the step's W_p
    call(head, make_batches(1, dim=DIM, seed=9)[0]).sum().backward()  # a first step, so W_p is not I
    z0, z1 = (z.requires_grad_(True) for z in make_batches(2, dim=DIM))
    plain = [z.detach().clone().requires_grad_(True) for z in (z0, z1)]
    weight = head.weight.clone()
    outs = [checkpoint(head, z, use_reentrant=False) for z in (z0, z1)]
    (outs[0].sum() + outs[1].sum()).backward()  # recomputed, then the step ends and W_p is refreshed
    assert not torch.equal(head.weight, weight)
    for z, p in zip((z0, z1), plain):
        (p @ weight.T).sum().backward()
        torch.testing.assert_close(z.grad, p.grad)


def test_through_a_head_a_skip_is_learned_one_step_late_and_survives_saving_and_copies():
    head = DirectPredHead(DIM, calls_per_update=1)
    batches = make_batches(3, dim=DIM)
    call(head, batches[0])
    bad = batches[1].clone()
    bad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not yet known on the host: no warning
        call(head, bad)
    assert int(head.num_skipped) == 1  # on the device at once
    assert head.steps.known == [0, 0] and head.steps.peek_counters() == [1, 0]
    saved = head.state_dict()
    resumed = DirectPredHead(DIM, calls_per_update=1)
    resumed.load_state_dict(saved)
    assert resumed.steps.state() == head.steps.state()
    for other in (head, resumed, copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        with pytest.warns(RuntimeWarning, match="not representable"):
            call(other, batches[2])
        assert other.steps.known == [1, 0] and int(other.num_skipped) == 1


def test_through_a_head_a_refusal_learned_late_makes_the_next_refresh_thorough(monkeypatch):
    from _helpers import record_levels, refuse

    refuse(monkeypatch, "normal")
    levels = record_levels(monkeypatch)
    head = DirectPredHead(DIM, refresh="iterative", calls_per_update=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the refusal's warning
        for z in make_batches(4, dim=DIM):
            call(head, z)
    assert levels == ["normal", "thorough", "normal", "thorough"]
    assert head.steps.thorough_refreshes == 2 and head.steps.exact_refreshes == 0
    assert int(head.refresh_rejections) == 2


def test_reset_running_stats_resets_the_steps():
    head = DirectPredHead(DIM, calls_per_update=2)
    for z in make_batches(3, dim=DIM):
        call(head, z)
    head.reset_running_stats()
    assert head.steps.state() == Steps(head.freq, 2).state()
    assert int(head.num_updates) == 0 and torch.equal(head.weight, torch.eye(DIM))
