"""The width of the DirectPred head that takes over a predictor, read off the predictor's linear layers.

Both adapters replace an MLP predictor (lightly's prediction heads, solo-learn's
``predictor``) by a square ``W_p``, so the MLP must map its input width to itself.
"""

from __future__ import annotations

from torch import nn

__all__ = ["replaced_width"]


def replaced_width(predictor: nn.Module) -> int:
    """The ``in_features`` of ``predictor``'s first ``nn.Linear``, which its last one must output.

    Raises ``ValueError`` when it has no ``nn.Linear`` or does not map that width onto itself.
    """
    linears = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(predictor).__name__} has no nn.Linear to read its width from")
    width, output = linears[0].in_features, linears[-1].out_features
    if width != output:
        raise ValueError(
            f"{type(predictor).__name__} maps width {width} to {output}, but DirectPred replaces a predictor "
            "that maps its input width to itself (W_p is square)"
        )
    return width
