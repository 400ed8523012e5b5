"""What ``compare`` measures on a model: kNN and linear-probe accuracy of its backbone (scikit-learn),
the collapse of its projections and the eigenspace alignment of a linear predictor.

The probes run with one BLAS thread: next to PyTorch's OpenMP pool in the same process,
multi-threaded OpenBLAS spins and made the digits probe about 100x slower (seconds instead
of tens of milliseconds) on a 2-core machine.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from directpred_plugin.functional import collapse_indicator, effective_rank, eigenspace_alignment

from .data import Dataset
from .methods import Method


@torch.no_grad()
def embed(module: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]],
          encode: Callable[[Tensor], Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """Run ``encode`` over ``(x, y)`` batches with ``module`` in eval mode; returns features and labels."""
    mode = module.training
    module.eval()
    try:
        feats, labels = zip(*((encode(x).flatten(1).float().cpu(), y.cpu()) for x, y in batches))
    finally:
        module.train(mode)
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


def projection_rank(z: Tensor) -> float:
    """Effective rank of a batch of projections: ``exp`` of the entropy of the normalised singular
    values of the centred rows (RankMe, Garrido et al. 2023, with centring).

    1 when every projection lies on one line, ``dim`` for isotropic projections. Unlike the
    std of normalised outputs it also falls under dimensional collapse, where projections
    still vary but only along a few directions.
    """
    z = z.detach().double()
    return float(effective_rank(torch.linalg.svdvals(z - z.mean(0))))


def probe_accuracy(method: Method, data: Dataset, batch_size: int, knn_k: int, device: torch.device,
                   linear: bool = True) -> Dict[str, Optional[float]]:
    """kNN and (unless ``linear`` is False) linear-probe top-1 of the backbone's features: fit on the
    clean training images, scored on the test images. ``linear_top1`` is None when skipped."""
    batch = max(batch_size, 256)
    train_x, train_y = embed(method, data.labelled("train", batch, device), method.encode)
    test_x, test_y = embed(method, data.labelled("test", batch, device), method.encode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on collapsed features
        return {
            "knn_top1": knn_top1(train_x, train_y, test_x, test_y, k=knn_k),
            "linear_top1": linear_probe_top1(train_x, train_y, test_x, test_y) if linear else None,
        }


def evaluate(method: Method, data: Dataset, batch_size: int, knn_k: int, device: torch.device,
             matrix: Optional[Callable[[nn.Module], Tensor]]) -> Dict[str, Optional[float]]:
    """kNN and linear-probe top-1 of the backbone's features (probes fit on the clean training images,
    scored on the test images), collapse measures of the test projections and, for a one-matrix
    predictor, its eigenspace alignment with the correlation of the training projections."""
    batch = max(batch_size, 256)
    metrics = probe_accuracy(method, data, batch_size, knn_k, device)
    test_z, _ = embed(method, data.labelled("test", batch, device), method.project)
    metrics["collapse"] = float(collapse_indicator(torch.from_numpy(test_z)))
    metrics["effective_rank"] = projection_rank(torch.from_numpy(test_z))
    metrics["alignment"] = None
    if matrix is not None:
        train_z, _ = embed(method, data.labelled("train", batch, device), method.project)
        z = torch.from_numpy(train_z).double()
        corr = z.T @ z / len(z)  # correlation of the predictor's input (clean training images)
        value = float(eigenspace_alignment(matrix(method.predictor).detach().cpu(), corr))
        metrics["alignment"] = value if math.isfinite(value) else None
    return metrics
