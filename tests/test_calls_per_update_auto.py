"""``calls_per_update="auto"``: one pooled update per training step, however the step is driven.

Each test records the projections the head saw in each step and checks the head against
the reference recurrence fed the concatenation of each step's views (one update per step,
folded at the next step's first call).
"""

import numpy as np
import pytest
import torch
from torch import nn

from _lightly_models import TwoViews, byol_class, quiet_trainer_options
from _reference import ReferenceHead
from directpred_plugin import DirectPredHead

DIM = 8


class Recorder(nn.Module):
    """Passes z through and keeps a copy of every training-mode batch, grouped by step."""

    def __init__(self):
        super().__init__()
        self.steps = [[]]

    def forward(self, z):
        if self.training and torch.is_grad_enabled():
            self.steps[-1].append(z.detach().double().clone())
        return z

    def new_step(self):
        self.steps.append([])


def _reference_after(steps, **options):
    ref = ReferenceHead(DIM, **options)
    for views in steps:
        ref.fold(torch.cat(views).numpy())
    return ref


def _check(head, steps, **options):
    """All complete steps but the last are folded; the last one sits in the pool."""
    folded, pending = steps[:-1], steps[-1]
    ref = _reference_after(folded, **options)
    assert int(head.num_updates) == len(folded)
    np.testing.assert_allclose(head.corr.numpy(), ref.F, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(head.weight.numpy(), ref.W, rtol=1e-8, atol=1e-10)
    assert int(head.pending_count) == sum(len(v) for v in pending)


@pytest.mark.parametrize("crops", [[16, 16], [16, 16, 6, 6, 6, 6]], ids=["two-views", "multi-crop-2+4"])
def test_each_step_makes_one_update_from_all_its_views(crops):
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, DIM)).double()
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64, refresh="exact")
    recorder = Recorder()
    opt = torch.optim.SGD(projector.parameters(), lr=0.1)
    for step in range(5):
        outs = [head(recorder(projector(torch.randn(n, 5, dtype=torch.float64)))) for n in crops]
        loss = sum(o.pow(2).mean() for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.new_step()
        # every view of a step was predicted with the same W_p (the one before the step)
    recorder.steps.pop()  # the empty list opened after the last backward
    _check(head, recorder.steps)


def test_gradient_accumulation_folds_each_micro_batch_step():
    torch.manual_seed(1)
    # nonlinear, so the statistics are full rank (null eigenvalues' roots are rounding noise)
    projector = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, DIM)).double()
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64, refresh="exact")
    recorder = Recorder()
    for micro in range(6):  # 3 optimizer steps of 2 micro-batches, 2 views each
        views = [head(recorder(projector(torch.randn(8, 5, dtype=torch.float64)))) for _ in range(2)]
        sum(v.sum() for v in views).backward()
        recorder.new_step()
    recorder.steps.pop()
    _check(head, recorder.steps)


def test_lightning_automatic_optimization_makes_one_update_per_step(tmp_path):
    import pytorch_lightning as pl

    torch.manual_seed(0)
    model = byol_class(pl)(calls_per_update="auto", stats_dtype=torch.float64, refresh="exact")
    model.double()
    seen = Recorder()
    model.prediction_head = nn.Sequential(seen, model.prediction_head)

    class StepMarks(pl.Callback):
        def on_train_batch_end(self, *args):
            seen.new_step()

    trainer = pl.Trainer(default_root_dir=tmp_path, **{**quiet_trainer_options(), "logger": False,
                                                      "enable_checkpointing": False, "max_steps": 4})
    trainer.callbacks.append(StepMarks())
    data = TwoViews()
    data.views = [v.double() for v in data.views]
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    seen.steps.pop()
    head = model.prediction_head[1]
    assert len(seen.steps) == 4 and all(len(v) == 2 for v in seen.steps)
    _check(head, seen.steps)


def test_auto_grouping_under_torch_compile_matches_eager():
    torch.manual_seed(2)
    projector = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, DIM))
    eager_head = DirectPredHead(DIM, calls_per_update="auto", refresh="exact")
    compiled_head = DirectPredHead(DIM, calls_per_update="auto", refresh="exact")
    compiled_projector = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, DIM))
    compiled_projector.load_state_dict(projector.state_dict())
    compiled = torch.compile(nn.Sequential(compiled_projector, compiled_head))
    eager = nn.Sequential(projector, eager_head)
    batches = [[torch.randn(16, 5) for _ in range(2)] for _ in range(4)]
    for model in (eager, compiled):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for views in batches:
            loss = sum(model(x).pow(2).mean() for x in views)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert int(compiled_head.num_updates) == int(eager_head.num_updates) == 3
    torch.testing.assert_close(compiled_head.corr, eager_head.corr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_head.weight, eager_head.weight, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_auto_needs_an_input_that_requires_grad():
    head = DirectPredHead(DIM, calls_per_update="auto")
    with pytest.raises(ValueError, match="does not require grad"):
        head(torch.randn(4, DIM))
    head.update(torch.randn(4, DIM))  # feeding statistics directly: one update per call
    assert int(head.num_updates) == 1
