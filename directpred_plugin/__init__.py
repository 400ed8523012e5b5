"""DirectPred: a closed-form predictor head for BYOL/SimSiam-style self-supervised learning.

The core is `DirectPredHead`; ``directpred_plugin.lightly`` and
``directpred_plugin.solo`` adapt it to lightly and solo-learn.
"""

from .functional import collapse_indicator, eigenspace_alignment
from .head import DirectPredHead
from .losses import IsoLoss
from .variants import VARIANTS, directcopy_weight, directpred_weight

__version__ = "0.1.0"

__all__ = [
    "DirectPredHead",
    "IsoLoss",
    "VARIANTS",
    "directpred_weight",
    "directcopy_weight",
    "eigenspace_alignment",
    "collapse_indicator",
    "__version__",
]
