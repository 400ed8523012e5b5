"""Evaluation of a frozen backbone: kNN and linear-probe top-1 with scikit-learn.

The probes run with one BLAS thread: next to PyTorch's OpenMP pool in the same process,
multi-threaded OpenBLAS spins and made the digits probe about 100x slower (seconds instead
of tens of milliseconds) on a 2-core machine.
"""

from __future__ import annotations

from typing import Callable, Iterable, Tuple

import numpy as np
import torch
from torch import Tensor, nn


@torch.no_grad()
def embed(modules: Iterable[nn.Module], batches: Iterable[Tuple[Tensor, Tensor]],
          encode: Callable[[Tensor], Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """Run ``encode`` over ``(x, y)`` batches with ``modules`` in eval mode; returns features and labels."""
    modules = list(modules)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        feats, labels = [], []
        for x, y in batches:
            feats.append(encode(x).flatten(1).float().cpu())
            labels.append(y.cpu())
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def knn_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20) -> float:
    """Top-1 accuracy of a cosine-distance k-nearest-neighbour vote (distance-weighted)."""
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits

    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_y)), metric="cosine", algorithm="brute",
                               weights="distance")
    with threadpool_limits(limits=1, user_api="blas"):
        knn.fit(train_x, train_y)
        return float(knn.score(test_x, test_y))


def linear_probe_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      max_iter: int = 1000) -> float:
    """Top-1 accuracy of a multinomial logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(train_x, train_y)
        return float(probe.score(test_x, test_y))
