"""Two gloo processes on CPU must end with the state of one process that saw the concatenated batches."""

import os
import warnings
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import assert_same_state
from directpred_plugin import DirectPredHead

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

DIM = 6
STEPS = 7
NAN_STEP = 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_batches(rank):
    """Uneven batch sizes per rank; rank 1 sends a NaN batch at NAN_STEP."""
    gen = torch.Generator().manual_seed(100 + rank)
    size = 5 if rank == 0 else 11
    batches = [torch.randn(size, DIM, generator=gen) * (1 + torch.arange(DIM)) for _ in range(STEPS)]
    if rank == 1:
        batches[NAN_STEP][0, 0] = float("nan")
    return batches


def _loaded(state, **kwargs):
    """A head (in this single process) holding a saved state: its counters read by name."""
    head = DirectPredHead(DIM, **kwargs)
    head.load_state_dict(state)
    return head


def _worker(rank, world, port, out_dir, kwargs, ddp=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head = DirectPredHead(DIM, **kwargs)
        call = head
        if ddp is not None:  # the head alone has no parameter for DDP: a fixed layer beside it
            from torch.nn.parallel import DistributedDataParallel

            model = torch.nn.ModuleDict({"head": head, "layer": torch.nn.Linear(1, 1)})
            wrapped = DistributedDataParallel(model, broadcast_buffers=ddp == "broadcast")
            model.forward = lambda z: (head(z), model["layer"].weight)[0]
            call = wrapped
        refused = None
        for z in _rank_batches(rank)[:_whole_pools(kwargs)]:
            try:
                call(z.requires_grad_(True))
            except RuntimeError as err:
                refused = str(err)
                break
        torch.save({"state": head.state_dict(), "refused": refused}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _whole_pools(kwargs):
    """The calls that make whole pools: an open pool is a rank's own and is not saved under DDP.

    These workers call the head without a backward pass, so an integer calls_per_update
    (not "auto", under which the calls would pool into one open step) closes the pools."""
    per_pool = kwargs["calls_per_update"]
    assert isinstance(per_pool, int)
    return STEPS - STEPS % per_pool


def _run_two_ranks(tmp_path, ddp=None, **kwargs):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), kwargs, ddp), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    if ddp is None:
        assert all(entry["refused"] is None for entry in saved)
        return [entry["state"] for entry in saved]
    return saved


@pytest.mark.timeout(300)
@pytest.mark.parametrize("calls_per_update", [1, 2])
def test_two_ranks_match_single_process_on_concatenated_batches(tmp_path, calls_per_update):
    kwargs = dict(freq=2, center=True, stats_dtype=torch.float64, calls_per_update=calls_per_update)
    states = _run_two_ranks(tmp_path, **kwargs)
    # whole pools: nothing of a rank's own is saved, the extra state (counters, schedule) included
    assert_same_state(states[0], states[1])

    single = DirectPredHead(DIM, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip is counted below
        for z0, z1 in list(zip(_rank_batches(0), _rank_batches(1)))[:_whole_pools(kwargs)]:
            single(torch.cat([z0, z1]).requires_grad_(True))
    expected = single.state_dict()
    assert set(expected) == set(states[0]) == {"weight", "corr", "mean", "_extra_state"}
    for key in expected:
        torch.testing.assert_close(states[0][key], expected[key], rtol=1e-10, atol=1e-12, msg=key)
    counters = _loaded(states[0], **kwargs)
    assert int(counters.num_skipped) == 1
    assert int(counters.num_updates) == _whole_pools(kwargs) // calls_per_update - 1  # all but the skipped pool
    assert not torch.equal(states[0]["weight"], torch.eye(DIM, dtype=torch.float64))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ddp", [None, "no-broadcast"], ids=["no-ddp", "ddp-broadcast_buffers-off"])
def test_sync_dist_off_keeps_ranks_independent(tmp_path, ddp):
    kwargs = dict(sync_dist=False, calls_per_update=1)
    saved = _run_two_ranks(tmp_path, ddp=ddp, **kwargs)
    states = saved if ddp is None else [entry["state"] for entry in saved]
    if ddp is not None:
        assert all(entry["refused"] is None for entry in saved)
    assert not torch.allclose(states[0]["corr"], states[1]["corr"])
    assert not torch.allclose(states[0]["weight"], states[1]["weight"])
    heads = [_loaded(state, **kwargs) for state in states]
    assert [int(head.num_updates) for head in heads] == [STEPS, STEPS - 1]  # rank 1 skipped its NaN batch
    assert int(heads[0].num_skipped) == 0 and int(heads[1].num_skipped) == 1
    # each rank's statistics are those of its own batches alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 1's NaN batch
        for rank, state in enumerate(states):
            alone = DirectPredHead(DIM, calls_per_update=1)
            for z in _rank_batches(rank):
                alone(z.requires_grad_(True))
            torch.testing.assert_close(state["corr"], alone.corr, msg=f"rank {rank}")


@pytest.mark.timeout(300)
def test_sync_dist_off_under_ddp_broadcasting_buffers_is_refused(tmp_path):
    """DDP's buffer broadcast would replace every rank's own statistics with rank 0's."""
    saved = _run_two_ranks(tmp_path, ddp="broadcast", sync_dist=False, calls_per_update=1)
    for entry in saved:
        assert entry["refused"] is not None and "broadcast_buffers" in entry["refused"]
        assert int(_loaded(entry["state"], sync_dist=False, calls_per_update=1).num_updates) == 0


# ------------------------------------------------------------- one collective per pool, under DDP
AUTO_STEPS = 4


def _views(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    size = 6 if rank == 0 else 9
    return [torch.randn(size, DIM, generator=gen, dtype=torch.float64) * (1 + torch.arange(DIM)) for _ in range(2)]


class _Model(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        torch.manual_seed(0)  # the same projector on every rank and in the single process
        self.projector = torch.nn.Linear(DIM, DIM).double()
        self.head = DirectPredHead(DIM, **kwargs)

    def forward(self, x):
        return self.head(self.projector(x))


def _frozen_optimizer(model):
    """SGD with lr=0: its step ends the head's step (a projector is upstream) and moves nothing, so
    the ranks (whose gradients DDP averages) and the single process keep the same projector."""
    return torch.optim.SGD(model.parameters(), lr=0.0)


def _ddp_worker(rank, world, port, out_dir, kwargs):
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reduced = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        reduced.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    try:
        model = _Model(**kwargs)
        # broadcast_buffers=True (DDP's default) broadcasts rank 0's buffers at every forward
        ddp = DistributedDataParallel(model, broadcast_buffers=True)
        optimizer = _frozen_optimizer(model)
        dist.all_reduce = counting
        for step in range(AUTO_STEPS):
            outs = [ddp(x) for x in _views(rank, step)]  # one DDP forward per view
            optimizer.zero_grad()
            sum(out.pow(2).mean() for out in outs).backward()
            optimizer.step()  # ends the step: its pool is summed over the ranks and folded
        dist.all_reduce = original
        model(_views(rank, AUTO_STEPS)[0])  # a call whose step is still open: the pool is this rank's
        try:
            model.head.state_dict()
            refused = None
        except RuntimeError as err:
            refused = str(err)
        model.head.steps.calls = 0  # only to save what was folded
        torch.save({"state": model.head.state_dict(), "reduced": reduced, "refused": refused},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("center", [False, True])
def test_ddp_makes_one_collective_per_pool_and_ranks_match_the_single_process(tmp_path, center):
    kwargs = dict(calls_per_update="auto", center=center, stats_dtype=torch.float64, freq=1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), kwargs), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for entry in saved:
        # one sum of the pool per step (and a first, small one for the common shift with center)
        per_step = [DIM * DIM + DIM + 1] if not center else [DIM + 1, DIM * DIM + DIM + 1]
        assert entry["reduced"] == per_step * AUTO_STEPS
        assert entry["refused"] is not None and "open pool" in entry["refused"]
    # the pools were emptied (the shift of an empty pool is not saved): every rank saves the same state
    assert_same_state(saved[0]["state"], saved[1]["state"])

    single = _Model(**kwargs)
    optimizer = _frozen_optimizer(single)
    for step in range(AUTO_STEPS):
        per_view = zip(*(_views(rank, step) for rank in range(2)))
        outs = [single(torch.cat(parts)) for parts in per_view]
        optimizer.zero_grad()
        sum(out.pow(2).mean() for out in outs).backward()
        optimizer.step()
    assert int(single.head.num_updates) == AUTO_STEPS
    expected = single.head.state_dict()
    for key in ("corr", "weight", "_extra_state") + (("mean",) if center else ()):
        torch.testing.assert_close(saved[0]["state"][key], expected[key], rtol=1e-10, atol=1e-12, msg=key)


def _resume_worker(rank, world, port, out_dir, checkpoint, init_before_load):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    head = DirectPredHead(DIM, calls_per_update=2, center=True, stats_dtype=torch.float64)
    if init_before_load:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    head.load_state_dict(torch.load(checkpoint, weights_only=True))
    if not init_before_load:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head(_rank_batches(rank)[0].double().requires_grad_(True))  # closes the loaded pool
        torch.save(head.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("init_before_load", [True, False], ids=["load-after-init", "load-before-init"])
def test_a_pool_saved_by_one_process_is_continued_once_by_two_ranks(tmp_path, init_before_load):
    """A saved open pool is the whole pool of its run: rank 0 continues it, not every rank."""
    saved = DirectPredHead(DIM, calls_per_update=2, center=True, stats_dtype=torch.float64)
    first = torch.randn(7, DIM, dtype=torch.float64) + 3
    saved(first.requires_grad_(True))
    torch.save(saved.state_dict(), tmp_path / "open.pt")
    mp.spawn(_resume_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path / "open.pt"), init_before_load),
             nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = DirectPredHead(DIM, calls_per_update=1, center=True, stats_dtype=torch.float64)
    single(torch.cat([first.detach(), _rank_batches(0)[0].double(), _rank_batches(1)[0].double()]).requires_grad_(True))
    for state in states:
        assert int(_loaded(state, calls_per_update=2, center=True, stats_dtype=torch.float64).num_updates) == 1
        torch.testing.assert_close(state["corr"], single.corr, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["mean"], single.mean, rtol=1e-10, atol=1e-12)
