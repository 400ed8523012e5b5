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


def _worker(rank, world, port, out_dir, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head = DirectPredHead(DIM, **kwargs)
        for z in _rank_batches(rank):
            head(z.requires_grad_(True))
        torch.save(head.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path, **kwargs):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), kwargs), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("calls_per_update", [1, 2])
def test_two_ranks_match_single_process_on_concatenated_batches(tmp_path, calls_per_update):
    kwargs = dict(freq=2, center=True, stats_dtype=torch.float64, calls_per_update=calls_per_update)
    states = _run_two_ranks(tmp_path, **kwargs)
    assert_same_state(states[0], states[1])

    single = DirectPredHead(DIM, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip is counted below
        for z0, z1 in zip(_rank_batches(0), _rank_batches(1)):
            single(torch.cat([z0, z1]).requires_grad_(True))
    expected = single.state_dict()
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            torch.testing.assert_close(states[0][key], expected[key], rtol=1e-10, atol=1e-12, msg=key)
        else:
            assert states[0][key] == expected[key], key
    assert int(states[0]["stats.num_skipped"]) == 1
    assert not torch.equal(states[0]["weight"], torch.eye(DIM, dtype=torch.float64))


@pytest.mark.timeout(300)
def test_sync_dist_off_keeps_ranks_independent(tmp_path):
    states = _run_two_ranks(tmp_path, sync_dist=False)
    assert not torch.allclose(states[0]["stats.corr"], states[1]["stats.corr"])
    assert int(states[0]["stats.num_skipped"]) == 0 and int(states[1]["stats.num_skipped"]) == 1
