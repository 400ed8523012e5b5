"""DirectPred: a closed-form predictor head for BYOL/SimSiam-style self-supervised learning.

The core is :class:`DirectPredHead`; ``directpred_plugin.lightly`` and
``directpred_plugin.solo`` adapt it to lightly and solo-learn.
"""

from .functional import (
    collapse_indicator,
    directcopy_weight,
    directpred_weight,
    eigenspace_alignment,
)
from .head import DirectPredHead
from .losses import IsoLoss
from .predictors import PREDICTORS, create_predictor
from .refresh import REFRESH_STRATEGIES
from .rules import VARIANTS

__version__ = "0.1.0"

__all__ = [
    "DirectPredHead",
    "IsoLoss",
    "create_predictor",
    "PREDICTORS",
    "VARIANTS",
    "REFRESH_STRATEGIES",
    "directpred_weight",
    "directcopy_weight",
    "eigenspace_alignment",
    "collapse_indicator",
    "__version__",
]
