"""A run resumes only from a checkpoint trained with the same predictor.

`RESUME_MUST_MATCH` are the cfg keys `register` adds to
solo-learn's ``AutoResumer.SHOULD_MATCH``; `check_checkpoint_predictors` refuses to load
a checkpoint whose predictor is a DirectPred head into a model built with the MLP, or back.
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple

from ..head import DirectPredHead
from .config import HEAD_OPTIONS
from .methods import METHOD_PREDICTORS

__all__ = ["RESUME_MUST_MATCH", "check_checkpoint_predictors"]

#: A run never auto-resumes a checkpoint trained with another predictor or other head options
#: (its state_dict would not load, or would train on differently). The cfg holds the options the
#: config gave (validated), so equal configs compare equal; the logging interval may differ.
RESUME_MUST_MATCH: Tuple[str, ...] = (
    "method_kwargs.predictor",
    *(f"method_kwargs.directpred.{option}" for option in HEAD_OPTIONS),
)


def check_checkpoint_predictors(model: Any, state_dict: Mapping[str, Any]) -> None:
    """Raise ``RuntimeError`` if ``state_dict`` holds another kind of predictor than ``model`` has."""
    method = getattr(model, "solo_method", None)  # None: built before register()
    for attr in METHOD_PREDICTORS.get(method, {}) if method else ():
        saved = [k for k in state_dict if k.startswith(attr + ".")]
        if not saved:
            continue
        saved_directpred = f"{attr}.corr" in state_dict
        built_directpred = isinstance(getattr(model, attr), DirectPredHead)
        if saved_directpred != built_directpred:
            describe = {True: "a DirectPred head (a closed-form method_kwargs.predictor)",
                        False: "solo-learn's MLP (method_kwargs.predictor: mlp or unset)"}
            raise RuntimeError(
                f"cannot resume {method}: the checkpoint's {attr} is {describe[saved_directpred]}, "
                f"but this run builds {describe[built_directpred]}. Resume with the predictor setting "
                "the checkpoint was trained with."
            )
