"""WeightSnapshots: one copy of W_p per refresh, and one cast of it per input dtype."""

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
