"""lightly adapter: DirectPred as a drop-in for lightly's prediction heads."""

from __future__ import annotations

from typing import Any, Optional

from .head import DirectPredHead


class DirectPredPredictionHead(DirectPredHead):
    """Prediction head for BYOL/SimSiam set in closed form by DirectPred [0].

    A drop-in for lightly's ``BYOLPredictionHead`` and ``SimSiamPredictionHead``: it maps
    ``input_dim`` to ``input_dim`` with ``W_p`` computed from the correlation of its
    input instead of an MLP trained by gradient. All :class:`DirectPredHead` options are
    accepted as keywords.

    - [0]: Tian, Chen & Ganguli, "Understanding self-supervised learning dynamics
      without contrastive pairs", ICML 2021, https://arxiv.org/abs/2102.06810

    Examples:
        >>> # BYOL: replaces BYOLPredictionHead(256, 4096, 256)
        >>> prediction_head = DirectPredPredictionHead(256)
        >>> # SimSiam: replaces SimSiamPredictionHead(2048, 512, 2048)
        >>> prediction_head = DirectPredPredictionHead(2048, freq=5)
    """

    def __init__(self, input_dim: int = 256, output_dim: Optional[int] = None, **options: Any) -> None:
        if output_dim is not None and output_dim != input_dim:
            raise ValueError(
                f"DirectPredPredictionHead maps input_dim to itself (got input_dim={input_dim}, "
                f"output_dim={output_dim}): W_p = U diag(p) U^T is built from the eigenvectors of "
                "the input's own correlation, so it is square. Set output_dim=input_dim or leave it out."
            )
        super().__init__(input_dim, **options)
