"""Gradient accumulation with ``calls_per_update="auto"``: one update of F_hat per optimizer step.

A training step is what the optimizer steps. Every training-mode call between two optimizer
steps (every view of every micro-batch) pools into one update; ``freq`` counts optimizer
steps; between micro-batches ``W_p`` and ``num_updates`` do not move; once ``opt.step()``
has returned the step is folded. A trainable ``W_p`` is refreshed only after the optimizer
used its gradient. Where no optimizer step can be in view (no trainable parameter upstream,
``W_p`` a buffer), each backward pass still ends a step.

Each run here is compared with a reference that sees the same rows as one batch per
optimizer step: one forward per view on the concatenated micro-batches (or, where the
projector's training is not repeated, a head with ``calls_per_update=1`` fed each step's
rows at once).
"""

import os
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.functional import cosine_similarity

from directpred_plugin import DirectPredHead

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

DIM = 8
IN = 12
STEPS = 5
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _micro_batch(step, micro, rows=10, rank=0):
    """Two views of one micro-batch, float64, different for every (rank, step, micro-batch)."""
    gen = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    base = torch.randn(rows, IN, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, IN, dtype=torch.float64)
    return [base + 0.3 * torch.randn(rows, IN, generator=gen, dtype=torch.float64) for _ in range(2)]


def _loss(p0, p1, z0, z1):
    """BYOL/SimSiam's symmetric loss, summed over rows: micro-batch gradients add up to the batch's."""
    return -(cosine_similarity(p0, z1.detach()) + cosine_similarity(p1, z0.detach())).sum()


class _Net(nn.Module):
    """A trainable projector (float64) in front of the head; the same initial weights everywhere."""

    def __init__(self, **head_options):
        super().__init__()
        torch.manual_seed(0)
        self.projector = nn.Linear(IN, DIM).double()
        self.head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64, **head_options)
        if self.head.trainable:
            self.head.double()  # the optimizer's parameter follows the module's dtype

    def forward(self, x):
        return self.head(self.projector(x))

    def step_loss(self, x0, x1):
        z0, z1 = self.projector(x0), self.projector(x1)
        return _loss(self.head(z0), self.head(z1), z0, z1)


def _used_weight(z, p):
    """The W_p a call used, from its input and output (p = z W_p^T; z has more rows than columns)."""
    return torch.linalg.lstsq(z.detach(), p.detach()).solution.T


def _assert_same_head(head, ref, with_params=()):
    torch.testing.assert_close(head.corr, ref.corr, **TIGHT, msg="corr")
    torch.testing.assert_close(head.weight.detach(), ref.weight.detach(), rtol=1e-9, atol=1e-11, msg="weight")
    assert int(head.num_updates) == int(ref.num_updates)


# --------------------------------------------------------------- 1. plain PyTorch, k micro-batches
HEADS = {"directpred": {}, "directcopy": {"variant": "directcopy"}, "freq2": {"freq": 2}}


def _accumulated_run(net, k, steps, observe=None):
    """``steps`` optimizer steps of ``k`` micro-batches each (two views, one backward per micro-batch).

    Returns what the schedule looked like: per step, whether W_p and ``num_updates`` stayed as
    the step's first calls saw them until its last micro-batch, and ``num_updates`` after
    each ``opt.step()``.
    """
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    head = net.head
    moved, after_step = [], []
    for step in range(steps):
        opt.zero_grad()
        for micro in range(k):
            x0, x1 = _micro_batch(step, micro)
            z0, z1 = net.projector(x0), net.projector(x1)
            p0, p1 = head(z0), head(z1)
            if micro == 0:  # W_p and the count the step's calls see (a refresh due may land at its first call)
                weight, updates = head.weight.detach().clone(), int(head.num_updates)
            if observe is not None:
                observe(step, micro, (z0, p0), (z1, p1))
            _loss(p0, p1, z0, z1).backward()
            if micro < k - 1:
                if not torch.equal(head.weight.detach(), weight):
                    moved.append(f"step {step}: W_p changed after micro-batch {micro}")
                if int(head.num_updates) != updates:
                    moved.append(f"step {step}: num_updates moved from {updates} to {int(head.num_updates)} "
                                 f"after micro-batch {micro}")
        opt.step()
        after_step.append(int(head.num_updates))
    return moved, after_step


def _concatenated_run(net, k, steps, observe=None):
    """The reference: per optimizer step one forward per view on the k micro-batches concatenated."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(steps):
        parts = [_micro_batch(step, micro) for micro in range(k)]
        x0, x1 = (torch.cat(view) for view in zip(*parts))
        opt.zero_grad()
        z0, z1 = net.projector(x0), net.projector(x1)
        p0, p1 = net.head(z0), net.head(z1)
        if observe is not None:
            observe(step, 0, (z0, p0), (z1, p1))
        _loss(p0, p1, z0, z1).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("head_options", list(HEADS.values()), ids=list(HEADS))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_micro_batches_of_one_optimizer_step_make_one_update(k, head_options):
    accumulated, reference = _Net(**head_options), _Net(**head_options)
    moved, after_step = _accumulated_run(accumulated, k, STEPS)
    _concatenated_run(reference, k, STEPS)
    assert not moved, moved[0]
    assert after_step == list(range(1, STEPS + 1)), f"num_updates after each opt.step(): {after_step}"
    _assert_same_head(accumulated.head, reference.head)
    assert int(accumulated.head.num_updates) == STEPS
    for (name, mine), (_, theirs) in zip(accumulated.projector.named_parameters(),
                                         reference.projector.named_parameters()):
        torch.testing.assert_close(mine, theirs, **TIGHT, msg=name)


# --------------------------------------------------- 2. a trainable W_p under gradient accumulation
def test_trainable_weight_is_the_same_for_every_micro_batch_and_refreshed_after_the_optimizer_step():
    k, steps = 2, 7  # freq=3: refreshes due after optimizer steps 3 and 6
    options = dict(trainable=True, freq=3)
    accumulated, reference = _Net(**options), _Net(**options)
    used = {}  # (step, micro, view) -> W_p the call used
    ref_used = {}

    def recorder(into):
        def observe(step, micro, *calls):
            for view, (z, p) in enumerate(calls):
                into[step, micro, view] = _used_weight(z, p)
        return observe

    moved, after_step = _accumulated_run(accumulated, k, steps, observe=recorder(used))
    _concatenated_run(reference, k, steps, observe=recorder(ref_used))
    for step in range(steps):
        expected = ref_used[step, 0, 0]
        for micro in range(k):
            for view in range(2):
                torch.testing.assert_close(used[step, micro, view], expected, rtol=1e-8, atol=1e-10,
                                           msg=f"W_p of step {step}, micro-batch {micro}, view {view}")
    # After a refresh-due step the next one predicts with the refresh itself (symmetric, from F_hat),
    # not with the refresh moved by that step's gradient: the refresh came after opt.step().
    for step in (3, 6):
        w = used[step, 0, 0]
        torch.testing.assert_close(w, w.T, rtol=0, atol=1e-9, msg=f"W_p used in step {step} is a refresh")
        assert not torch.allclose(used[step - 1, 0, 0], w, rtol=0, atol=1e-9)
    assert not moved, moved[0]
    assert after_step == list(range(1, steps + 1)), f"num_updates after each opt.step(): {after_step}"
    _assert_same_head(accumulated.head, reference.head)
    assert int(accumulated.head.num_updates) == steps
    for mine, theirs in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, **TIGHT)


# ------------------------------------------------------------ 3. Lightning's accumulate_grad_batches
def test_lightning_accumulate_grad_batches_makes_one_update_per_optimizer_step(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.projector = nn.Linear(IN, DIM).double()
            self.head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64)
            self.projections = []  # per micro-batch, the rows the head received (both views)

        def training_step(self, batch, batch_idx):
            x0, x1 = batch
            z0, z1 = self.projector(x0), self.projector(x1)
            self.projections.append(torch.cat([z0, z1]).detach().clone())
            return _loss(self.head(z0), self.head(z1), z0, z1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    batches = [tuple(_micro_batch(step, 0)) for step in range(8)]
    model = Module()
    trainer = pl.Trainer(accumulate_grad_batches=2, max_steps=3, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and small loaders
        trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3 and len(model.projections) == 6
    updates = int(model.head.num_updates)
    assert updates == trainer.global_step, f"num_updates={updates} after {trainer.global_step} optimizer steps"
    assert model.head.diagnostics()["num_updates"] == trainer.global_step

    ref = DirectPredHead(DIM, calls_per_update=1, stats_dtype=torch.float64)
    for step in range(3):
        ref(torch.cat(model.projections[2 * step: 2 * step + 2]).requires_grad_(True))
    _assert_same_head(model.head, ref)


# -------------------------------------------------- 4. DDP, no_sync() on the first of two micro-batches
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout: ranks that disagree on the collectives fail instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))


def _rank_rows(rank):
    return 6 if rank == 0 else 9


def _record_inputs(head):
    """The rows of every training-mode call of ``head``, appended to the returned list as they come."""
    seen = []

    def hook(module, args):
        if module.training and torch.is_grad_enabled():
            seen.append(args[0].detach().clone())

    head.register_forward_pre_hook(hook)
    return seen


def _ddp_accumulation_worker(rank, world, port, out_dir, broadcast_buffers, head_options, k, steps):
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, world, port)
    try:
        model = _Net(**head_options)
        seen = _record_inputs(model.head)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 prefers forward_sync_buffers
            ddp = DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        per_step, between, after_step = [], [], []
        for step in range(steps):
            opt.zero_grad()
            start = len(seen)
            for micro in range(k):
                x0, x1 = _micro_batch(step, micro, rows=_rank_rows(rank), rank=rank)
                last = micro == k - 1
                with (torch.enable_grad() if last else ddp.no_sync()):
                    z0, z1 = model.projector(x0), model.projector(x1)
                    p0, p1 = ddp(x0), ddp(x1)  # one DDP forward per view
                    if micro == 0:
                        weight = model.head.weight.detach().clone()
                    _loss(p0, p1, z0, z1).backward()
                if not last:
                    between.append((int(model.head.num_updates), torch.equal(model.head.weight, weight)))
            opt.step()
            after_step.append(int(model.head.num_updates))
            per_step.append(torch.cat(seen[start:]))
        head = model.head
        state = {"corr": head.corr.clone(), "weight": head.weight.detach().clone(),
                 "num_updates": head.num_updates.clone()}
        torch.save({"state": state, "per_step": per_step, "between": between, "after_step": after_step},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broadcast_buffers", [False, True], ids=["broadcast_buffers=False", "broadcast_buffers=True"])
def test_ddp_no_sync_micro_batches_make_one_synced_update_per_optimizer_step(tmp_path, broadcast_buffers):
    k, steps, options = 2, 3, {"freq": 2}
    mp.spawn(_ddp_accumulation_worker, nprocs=2, join=True,
             args=(2, _free_port(), str(tmp_path), broadcast_buffers, options, k, steps))
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank, entry in enumerate(saved):
        assert entry["after_step"] == list(range(1, steps + 1)), f"rank {rank}: num_updates after each opt.step()"
        # the micro-batch under no_sync() ended nothing: still the previous step's W_p and count
        for step, (updates, same_weight) in enumerate(entry["between"]):
            assert updates == step, f"rank {rank}: num_updates moved between the micro-batches of step {step}"
            assert same_weight, f"rank {rank}: W_p changed between the micro-batches of step {step}"
    for key in saved[0]["state"]:
        assert torch.equal(saved[0]["state"][key], saved[1]["state"][key]), f"ranks disagree on {key}"

    single = DirectPredHead(DIM, calls_per_update=1, stats_dtype=torch.float64, **options)
    for step in range(steps):
        single(torch.cat([saved[r]["per_step"][step] for r in range(2)]).requires_grad_(True))
    state = saved[0]["state"]
    torch.testing.assert_close(state["corr"], single.corr, **TIGHT, msg="corr")
    torch.testing.assert_close(state["weight"], single.weight, rtol=1e-9, atol=1e-11, msg="weight")
    assert int(state["num_updates"]) == steps


# ------------------------------------------------------------ 5. no optimizer step can be in view
def test_without_parameters_upstream_each_backward_pass_still_ends_a_step():
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    rows = []
    for backward in range(3):
        views = [torch.randn(10, DIM, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(2)]
        sum(head(z).pow(2).sum() for z in views).backward()
        rows.append(torch.cat([z.detach() for z in views]))
        assert int(head.num_updates) == backward + 1  # folded by this backward pass, no optimizer anywhere
    assert int(head.num_updates) == 3
    ref = DirectPredHead(DIM, calls_per_update=1, stats_dtype=torch.float64)
    for batch in rows:
        ref(batch.clone().requires_grad_(True))
    _assert_same_head(head, ref)


# ------------------------------------- 6. sync_dist=False under DDP's default broadcast_buffers=True
def _local_stats_worker(rank, world, port, out_dir, steps):
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, world, port)
    try:
        outcome = {"error": None}
        model = _Net(sync_dist=False, freq=1)
        seen = _record_inputs(model.head)
        try:
            ddp = DistributedDataParallel(model)  # broadcast_buffers=True, DDP's default
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            per_step = []
            for step in range(steps):
                start = len(seen)
                opt.zero_grad()
                x0, x1 = _micro_batch(step, 0, rows=_rank_rows(rank), rank=rank)
                z0, z1 = model.projector(x0), model.projector(x1)
                _loss(ddp(x0), ddp(x1), z0, z1).backward()
                opt.step()
                per_step.append(torch.cat(seen[start:]))
            outcome.update(per_step=per_step, corr=model.head.corr.clone(), weight=model.head.weight.clone(),
                           num_updates=int(model.head.num_updates))
        except RuntimeError as err:
            outcome["error"] = str(err)
        torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_rank_local_statistics_under_broadcast_buffers_are_kept_or_refused(tmp_path):
    """Either each rank keeps its own EMA (and W_p from it), or the head refuses, naming broadcast_buffers.

    Today DDP's buffer broadcast at every forward overwrites rank 1's F_hat and W_p with
    rank 0's, and rank 1 folds its batches onto rank 0's estimate.
    """
    steps = 3
    mp.spawn(_local_stats_worker, args=(2, _free_port(), str(tmp_path), steps), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    errors = [o["error"] for o in outcomes]
    if any(e is not None for e in errors):
        for rank, error in enumerate(errors):  # refused on every rank, not on some (the others would hang)
            assert error is not None and "broadcast_buffers" in error, f"rank {rank}: {error!r}"
        return
    for rank, outcome in enumerate(outcomes):
        local = DirectPredHead(DIM, calls_per_update=1, stats_dtype=torch.float64, sync_dist=False)
        for rows in outcome["per_step"]:
            local(rows.clone().requires_grad_(True))
        assert outcome["num_updates"] == steps
        torch.testing.assert_close(outcome["corr"], local.corr, **TIGHT, msg=f"rank {rank}: corr")
        torch.testing.assert_close(outcome["weight"], local.weight, rtol=1e-9, atol=1e-11, msg=f"rank {rank}: weight")
    assert not torch.allclose(outcomes[0]["corr"], outcomes[1]["corr"])  # the ranks' data differ
