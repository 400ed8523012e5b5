"""Puts the chosen DirectPred heads into a solo-learn model's predictor slots, and says so on stderr.

`install_predictors` replaces each predictor `METHOD_PREDICTORS` lists by a head
of the same width and logs one INFO line per head (`log_to_stderr` shows it where
solo-learn's configs turn hydra's logging off); `drop_empty_groups` keeps the
optimizer's parameter groups valid once a head without parameters took an MLP's place.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping

from torch import nn

from ..head import DirectPredHead
from ..options import AUTO
from ..replacing import replaced_width
from .config import Settings, directpred_options, head_kwargs
from .methods import METHOD_PREDICTORS

__all__ = ["build_directpred", "install_predictors", "drop_empty_groups", "log_to_stderr"]


def _build(dim: int, member: str, options: Mapping[str, Any], calls_per_step: int) -> DirectPredHead:
    kwargs = dict(options)
    if kwargs.get("calls_per_update", AUTO) is None:
        kwargs["calls_per_update"] = calls_per_step
    return DirectPredHead(dim, variant=member, **kwargs)


def build_directpred(dim: int, options: Mapping[str, Any], calls_per_step: int,
                     predictor: str = "directpred") -> DirectPredHead:
    """The head ``method_kwargs.predictor: <predictor>`` puts in a solo-learn predictor slot.

    Built as ``DirectPredHead(dim, variant=predictor, ...)`` from ``options`` (validated by
    `directpred_options`). Unless ``calls_per_update`` is set, the head pools the
    calls between two optimizer steps: all views and micro-batches of a step are predicted
    with the same ``W_p``, the EMA takes one step from their pooled correlation and ``freq``
    counts optimizer steps, as in the paper. ``calls_per_update: null`` pools ``calls_per_step``
    training-mode calls instead (one per view: BYOL also predicts its small crops).
    """
    member, kwargs = head_kwargs(predictor, directpred_options(options, predictor))
    return _build(dim, member, kwargs, calls_per_step)


def install_predictors(model: nn.Module, method: str, settings: Settings) -> List[str]:
    """Replace ``method``'s predictors in ``model`` as ``settings`` say; the attributes replaced."""
    if settings.member is None:
        return []
    replaced = []
    for attr, calls_per_step in METHOD_PREDICTORS[method].items():
        try:
            dim = replaced_width(getattr(model, attr))
        except ValueError as err:
            raise ValueError(f"{method}.{attr}: {err}") from None
        head = _build(dim, settings.member, settings.head_options, calls_per_step(model))
        setattr(model, attr, head)
        replaced.append(attr)
        rank = os.environ.get("LOCAL_RANK")
        # Looked up here rather than at import: hydra's `job_logging: disabled` (solo-learn's
        # configs) disables every logger that already exists when it configures logging.
        logging.getLogger(__package__).info(
            "%s.%s = %s(%s), %d calls per training step (pid %d%s)",
            method, attr, type(head).__name__, head.extra_repr(), calls_per_step(model),
            os.getpid(), f", LOCAL_RANK {rank}" if rank else "",
        )
    return replaced


def drop_empty_groups(model: Any, groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``groups`` without those a replaced predictor left empty (a closed-form head has no parameters)."""
    replaced = getattr(model, "replaced_predictors", [])
    if not any(not list(getattr(model, attr).parameters()) for attr in replaced):
        return groups
    # Every optimizer (and solo's static-lr bookkeeping) must only see groups with parameters.
    kept = []
    for group in groups:
        group = dict(group, params=list(group["params"]))
        if group["params"]:
            kept.append(group)
    return kept


def log_to_stderr() -> None:
    """Show this package's INFO lines (which predictor each model got) on stderr, once.

    solo-learn's configs disable hydra's logging setup, so without a handler of its own the
    line that confirms DirectPred is in use would not appear.
    """
    logger = logging.getLogger("directpred_plugin")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # solo-learn's code may give the root logger a handler too
