"""The solo-learn methods the adapter knows: where their predictors are and which loss IsoLoss stands in for.

`METHOD_PREDICTORS` names each method's predictor attributes and how often a training
step calls each; `ISOLOSS_METHODS` names the loss function each method's
``training_step`` calls on ``(p, z_target)`` and how IsoLoss's value maps onto it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple

__all__ = ["METHOD_PREDICTORS", "ISOLOSS_METHODS", "IsoLossSlot"]


def _large_crops(model: Any) -> int:
    return model.num_large_crops  # forward() runs once per large crop


def _all_crops(model: Any) -> int:
    return model.num_crops  # BYOL's multicrop_forward() also predicts every small crop


def _twice_per_large_crop(model: Any) -> int:
    return 2 * model.num_large_crops  # All4One: in forward() and again in training_step()


#: solo-learn method -> {attribute holding a predictor: training-mode calls per step}.
#: Every predictor listed maps ``proj_output_dim`` to itself and is called on the projector
#: output ``z``. byol, simsiam, nnbyol and nnsiam train it against a stop-gradient target
#: with a cosine loss, the setting DirectPred is derived for; nnclr, mocov3 and all4one
#: train it through a contrastive loss, where the swap works but the paper says nothing.
#: Add an entry to make a custom method's predictor switchable.
METHOD_PREDICTORS: Dict[str, Dict[str, Callable[[Any], int]]] = {
    "byol": {"predictor": _all_crops},
    "simsiam": {"predictor": _large_crops},
    "nnbyol": {"predictor": _large_crops},
    "nnsiam": {"predictor": _large_crops},
    "nnclr": {"predictor": _large_crops},
    "mocov3": {"predictor": _large_crops},
    "all4one": {"predictor": _twice_per_large_crop, "predictor2": _large_crops},
}


class IsoLossSlot(NamedTuple):
    """The loss call in a method's ``training_step`` that IsoLoss takes over."""

    module: str
    """The module defining the method's ``training_step``."""
    function: str
    """The global name that ``training_step`` calls as ``function(p, z_target)``."""
    offset: float
    """``function``'s value is ``offset + factor * IsoLoss``."""
    factor: float


#: solo-learn method -> the loss call IsoLoss takes over with ``method_kwargs.loss: isoloss``:
#: BYOL's ``2 - 2 cos`` becomes ``2 + 2 IsoLoss``, SimSiam's ``-cos`` IsoLoss itself.
ISOLOSS_METHODS: Dict[str, IsoLossSlot] = {
    "byol": IsoLossSlot("solo.methods.byol", "byol_loss_func", 2.0, 2.0),
    "nnbyol": IsoLossSlot("solo.methods.nnbyol", "byol_loss_func", 2.0, 2.0),
    "simsiam": IsoLossSlot("solo.methods.simsiam", "simsiam_loss_func", 0.0, 1.0),
    "nnsiam": IsoLossSlot("solo.methods.nnsiam", "simsiam_loss_func", 0.0, 1.0),
}
