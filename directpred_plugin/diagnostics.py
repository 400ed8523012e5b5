"""What a head reports for logging: spectra, eigenspace alignment and its counters, by name.

Each value is named after the state it reads. Computed on demand (float64
eigendecompositions and host reads), so loggers call it every N steps, not every step.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from . import functional

__all__ = ["spectra", "alignment", "diagnostics"]


@torch.no_grad()
def spectra(head: Any) -> Dict[str, Tensor]:
    """Eigenvalues (descending, float64) of ``F_hat`` and of the symmetric part of ``W_p``."""
    weight = head.weight.detach().double()
    return {"corr": torch.linalg.eigvalsh(head.stats.corr.double()).flip(0),
            "weight": torch.linalg.eigvalsh((weight + weight.mT) / 2).flip(0)}


@torch.no_grad()
def alignment(head: Any) -> float:
    """Eigenspace alignment of ``W_p`` with ``F_hat`` (:func:`functional.eigenspace_alignment`); NaN before any update."""
    if int(head.stats.num_updates) == 0:
        return float("nan")
    return float(functional.eigenspace_alignment(head.weight, head.stats.corr))


@torch.no_grad()
def diagnostics(head: Any) -> Dict[str, float]:
    corr, weight = spectra(head).values()
    updates = int(head.stats.num_updates)
    return {
        "alignment": alignment(head), "last_collapse": float(head.stats.last_collapse),
        "corr_eig_max": float(corr[0]), "corr_eig_min": float(corr[-1]),
        "corr_effective_rank": float(functional.effective_rank(corr)) if updates else float("nan"),
        "weight_eig_max": float(weight[0]), "weight_eig_min": float(weight[-1]),
        "num_updates": float(updates), "num_skipped": float(head.stats.num_skipped),
        "num_steps": float(head.schedule.steps),
        "refresh_rejections": float(head.refresher.refresh_rejections),
        "exact_refreshes": float(head.refresher.exact_refreshes),
        "thorough_refreshes": float(head.refresher.thorough_refreshes),
    }
