"""The diagnostics of a model's DirectPred heads, named as both adapters log them.

`head_metrics` names every head's `diagnostics`
``{prefix}/{head name}/{diagnostic}`` and reads them all from the device at once, for
lightly's `DirectPredDiagnostics` and the solo-learn methods.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from torch import nn

from .head import DirectPredHead, read_diagnostics

__all__ = ["named_heads", "head_metrics"]


def named_heads(module: nn.Module) -> List[Tuple[str, DirectPredHead]]:
    """Every DirectPredHead in ``module`` with its qualified name (``"head"`` for ``module`` itself)."""
    return [(name or "head", m) for name, m in module.named_modules() if isinstance(m, DirectPredHead)]


def head_metrics(heads: Sequence[Tuple[str, DirectPredHead]], prefix: str = "directpred") -> Dict[str, float]:
    """``{prefix}/{name}/{diagnostic}`` for every ``(name, head)``, one host read per device."""
    values = read_diagnostics([head for _, head in heads])
    return {f"{prefix}/{name}/{key}": value for (name, _), read in zip(heads, values) for key, value in read.items()}
