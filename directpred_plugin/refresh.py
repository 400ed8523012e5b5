"""How a :class:`~directpred_plugin.DirectPredHead` turns its correlation estimate into ``W_p``.

A refresh strategy is an ``nn.Module`` (so any state it keeps, e.g. a warm start, is saved
with the head) called as ``strategy(corr, variant, eps)``. It returns the new weight, or
``None`` when it could not compute a finite one, in which case the head keeps the previous
weight. Strategies are looked up by name in :data:`REFRESH_STRATEGIES`.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import torch
from torch import Tensor, nn

from .functional import VARIANTS


class ExactRefresh(nn.Module):
    """Full eigendecomposition of the correlation at every refresh: the reference rule.

    Runs in the correlation's own dtype (float32 or float64, never half precision). If the
    decomposition raises or yields a non-finite weight it is retried in float64; if that
    fails too, ``None`` is returned and the head keeps its previous weight.
    """

    def forward(self, corr: Tensor, variant: str, eps: float) -> Optional[Tensor]:
        weight_fn = VARIANTS[variant]
        dtypes = [corr.dtype] if corr.dtype == torch.float64 else [corr.dtype, torch.float64]
        for dtype in dtypes:
            try:
                weight = weight_fn(corr.to(dtype), eps)
            except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
                continue
            if bool(torch.isfinite(weight).all()):
                return weight
        return None


#: Refresh strategies by name; ``DirectPredHead(refresh=...)`` looks them up here.
REFRESH_STRATEGIES: Dict[str, Type[nn.Module]] = {
    "exact": ExactRefresh,
}
