"""Compiled vs eager training step of a small BYOL model with a DirectPred head.

``python -m directpred_plugin.benchmarks.compile_step [--steps N]`` builds a BYOL-style
model (MLP backbone, BN projector, DirectPred head with ``calls_per_update="auto"``, EMA
target), and for each of trainable/buffer ``W_p`` x exact/iterative refresh prints
``torch._dynamo.explain``'s graph and graph-break counts for one forward, the number of
graphs compiled over the run (no recompilation: it stays at the warm-up count), the median
step time of the compiled and the eager model (timed alternately, step by step, in one
process, after 10 warm-up steps), and how far the compiled run's ``W_p`` and ``F_hat``
end from the eager run's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from directpred_plugin import DirectPredHead

INPUT, HIDDEN, DIM, BATCH = 32, 256, 64, 128


class SmallBYOL(nn.Module):
    def __init__(self, trainable: bool, refresh: str) -> None:
        super().__init__()
        backbone = nn.Sequential(nn.Linear(INPUT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN))
        projector = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))
        self.online = nn.Sequential(backbone, projector)
        self.head = DirectPredHead(DIM, trainable=trainable, refresh=refresh)
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        p0, p1 = self.head(self.online(x0)), self.head(self.online(x1))
        with torch.no_grad():
            t0, t1 = self.target(x0), self.target(x1)
        return -(F.cosine_similarity(p0, t1).mean() + F.cosine_similarity(p1, t0).mean()) / 2


def _step(model: SmallBYOL, optimizer: torch.optim.Optimizer, forward, views: Tuple[Tensor, Tensor]) -> float:
    start = time.perf_counter()
    loss = forward(*views)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for online, target in zip(model.online.parameters(), model.target.parameters()):
            target.mul_(0.99).add_(online, alpha=0.01)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(BATCH, INPUT, generator=gen), torch.randn(BATCH, INPUT, generator=gen)) for _ in range(args.steps)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps, batch {BATCH}, dim {DIM}")
    for trainable in (False, True):
        for refresh in ("exact", "iterative"):
            torch.manual_seed(1)
            compiled_model = SmallBYOL(trainable, refresh)
            eager_model = copy.deepcopy(compiled_model)
            explained = torch._dynamo.explain(copy.deepcopy(compiled_model).forward)(*data[0])
            torch._dynamo.reset()
            counters = torch._dynamo.utils.counters
            counters.clear()
            compiled = torch.compile(compiled_model)
            optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (compiled_model, eager_model)]
            compiled_s, eager_s = [], []
            for views in data:
                compiled_s.append(_step(compiled_model, optimizers[0], compiled, views))
                eager_s.append(_step(eager_model, optimizers[1], eager_model, views))
            weight_gap = (compiled_model.head.weight - eager_model.head.weight).abs().max().item()
            corr_gap = (compiled_model.head.corr - eager_model.head.corr).abs().max().item()
            print(
                f"trainable={trainable} refresh={refresh}: explain {explained.graph_count} graphs, "
                f"{explained.graph_break_count} breaks; compiled {counters['stats']['unique_graphs']} graphs over the run; "
                f"step ms compiled {1e3 * statistics.median(compiled_s[10:]):.2f} eager {1e3 * statistics.median(eager_s[10:]):.2f}; "
                f"max |W_p diff| {weight_gap:.1e}, max |F_hat diff| {corr_gap:.1e}"
            )
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
