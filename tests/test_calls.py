"""WeightSnapshots: one copy of W_p per refresh, and one cast of it per input dtype."""

import pytest
import torch

from directpred_plugin.calls import WeightSnapshots


def test_a_buffer_weight_is_copied_and_cast_once_per_refresh():
    weight = torch.randn(4, 4)
    snapshots = WeightSnapshots()
    first = snapshots.for_call(weight, False, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.to(torch.bfloat16))
    assert snapshots.for_call(weight, False, torch.bfloat16) is first  # the second view of the step
    assert snapshots.for_call(weight, False, torch.float32) is not weight  # a copy: a refresh writes in place
    weight.mul_(2)
    snapshots.changed()  # a refresh
    snapshots.new_step()
    second = snapshots.for_call(weight, False, torch.bfloat16)
    assert second is not first and torch.equal(second, weight.to(torch.bfloat16))
    assert snapshots.for_recomputation(weight, False, torch.bfloat16) is second


def test_a_trainable_weight_is_a_differentiable_copy_per_call():
    weight = torch.randn(4, 4, requires_grad=True)
    snapshots = WeightSnapshots()
    copy = snapshots.for_call(weight, True, torch.bfloat16)
    assert copy.requires_grad and copy.dtype == weight.dtype  # cast by the call, so the gradient flows
    assert snapshots.for_call(weight, True, torch.bfloat16) is not copy


def test_a_buffer_weight_rewritten_with_equal_values_keeps_the_step_recomputable():
    """DDP's buffer broadcast, a deepcopy: W_p's tensor version moves, its values do not."""
    weight = torch.randn(4, 4)
    snapshots = WeightSnapshots()
    snapshots.for_call(weight, False)
    weight.copy_(weight.clone())  # what a broadcast of the same values does
    snapshots.for_call(weight, False)
    assert torch.equal(snapshots.for_recomputation(weight, False), weight)


def test_a_trainable_weight_moved_inside_the_step_makes_it_unrecomputable():
    weight = torch.randn(4, 4, requires_grad=True)
    snapshots = WeightSnapshots()
    snapshots.for_call(weight, True)
    with torch.no_grad():
        weight.sub_(0.1)  # an optimizer step between two calls of the step
    snapshots.for_call(weight, True)
    with pytest.raises(RuntimeError, match="W_p changed between the calls"):
        snapshots.for_recomputation(weight, True)
