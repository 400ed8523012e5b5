"""Checks a solo-learn cfg's ``method_kwargs`` for the adapter once, before any module is built.

`check_method_kwargs` refuses every setting that would silently train something else
(an unknown predictor, a bad option, a misspelled key, IsoLoss where it cannot work) and
stores the validated options back into the cfg; `read_settings` gives what a model is
then built with. Nothing here builds a module: head options are checked by
`DirectPredHead.check_options <directpred_plugin.DirectPredHead.check_options>`.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, cast

import torch

from ..head import DirectPredHead
from ..options import AUTO, check_int
from ..variants import VARIANTS
from .choices import MLP, closed_form, predictor_choices, resolve_member
from .lookalikes import meant_key
from .methods import ISOLOSS_METHODS, METHOD_PREDICTORS

__all__ = [
    "DIRECTPRED_OPTIONS",
    "HEAD_OPTIONS",
    "ADAPTER_DEFAULTS",
    "LOSSES",
    "Settings",
    "directpred_options",
    "check_method_kwargs",
    "read_settings",
    "selected_predictor",
]

STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Keys of ``method_kwargs.directpred`` that are `DirectPredHead` options (``stats_dtype``
#: as ``"float32"``/``"float64"``; ``calls_per_update: null`` means the calls per training step
#: the method makes, see `METHOD_PREDICTORS`).
HEAD_OPTIONS: Tuple[str, ...] = (
    "rho",
    "eps",
    "freq",
    "variant",
    "trainable",
    "center",
    "calls_per_update",
    "stats_dtype",
    "sync_dist",
    "refresh",
    "refresh_options",
    "alpha",
    "eps_inside",
    "ridge",
    "weight_momentum",
)
#: Keys of ``method_kwargs.directpred`` that are the adapter's, with their defaults:
#: ``log_every_n_steps`` logs the heads' diagnostics through the model's ``self.log`` every
#: that many optimizer steps (0: never).
ADAPTER_DEFAULTS: Dict[str, Any] = {"log_every_n_steps": 50}
#: Every key accepted under ``method_kwargs.directpred``.
DIRECTPRED_OPTIONS: Tuple[str, ...] = HEAD_OPTIONS + tuple(ADAPTER_DEFAULTS)

#: Values of ``method_kwargs.loss``; options of IsoLoss go under ``method_kwargs.isoloss``.
LOSSES = ("default", "isoloss")
ISOLOSS_FORMS = ("cosine", "l2")

#: cfgs that `check_method_kwargs` validated, by identity: a model built from one is not checked again.
_VALIDATED: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Settings:
    """What the adapter builds into a model, read from a validated cfg."""

    member: Optional[str] = None
    """The member of the family each predictor becomes; None keeps the method's own predictors."""
    head_options: Dict[str, Any] = field(default_factory=dict)
    """``DirectPredHead`` keyword options (``calls_per_update`` None: the calls per step)."""
    isoloss_form: Optional[str] = None
    """IsoLoss's form with ``method_kwargs.loss: isoloss``, else None."""
    log_every_n_steps: int = 0
    """Log the heads' diagnostics every that many optimizer steps; 0 never."""


def head_kwargs(predictor: str, options: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The member and the ``DirectPredHead`` keyword options that validated ``options`` give."""
    member, kwargs = resolve_member(predictor, {k: v for k, v in options.items() if k in HEAD_OPTIONS})
    if "stats_dtype" in kwargs:
        kwargs["stats_dtype"] = STATS_DTYPES[kwargs["stats_dtype"]]
    return member, kwargs


def _checked_head(predictor: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The head's options after its own checks, on a width of 1 (the width is the model's)."""
    member, kwargs = head_kwargs(predictor, options)
    if kwargs.get("calls_per_update", AUTO) is None:
        kwargs["calls_per_update"] = 1  # null: the method's calls per step, an integer >= 1
    return DirectPredHead.check_options(1, variant=member, **kwargs)


def directpred_options(options: Optional[Mapping[str, Any]] = None, predictor: str = "directpred") -> Dict[str, Any]:
    """Validate ``method_kwargs.directpred`` for ``method_kwargs.predictor: <predictor>``.

    Returns the options the config gives, with ``calls_per_update`` defaulting to the head's
    ``"auto"`` (one update per optimizer step): what is stored back into the cfg (and compared by
    solo-learn's auto-resume). Nothing else is filled in: the head applies the name's
    defaults, and an option that means nothing for the variant is refused, not passed.
    Builds nothing. Raises ``ValueError`` naming the option and what was expected.
    """
    if not closed_form(predictor):
        raise ValueError(f"method_kwargs.predictor {predictor!r} takes no method_kwargs.directpred options; "
                         f"closed-form predictors: {list(VARIANTS)}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(DIRECTPRED_OPTIONS))
    if unknown:
        raise ValueError(
            f"method_kwargs.directpred: unknown option(s) {unknown}; valid options: {list(DIRECTPRED_OPTIONS)}"
        )
    stats_dtype = options.get("stats_dtype", "float32")
    if not isinstance(stats_dtype, str) or stats_dtype not in STATS_DTYPES:
        raise ValueError(
            f"method_kwargs.directpred.stats_dtype must be one of {sorted(STATS_DTYPES)}, got {stats_dtype!r}"
        )
    options.setdefault("calls_per_update", AUTO)
    try:
        if "log_every_n_steps" in options:
            check_int("log_every_n_steps", options["log_every_n_steps"], minimum=0, also="(0: never)")
        _checked_head(predictor, options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"method_kwargs.directpred: {err}") from None
    return options


def selected_predictor(cfg: Any) -> Optional[str]:
    """``method_kwargs.predictor`` of ``cfg``; None where it is not set."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, "method_kwargs.predictor", default=None)
    return None if value in (None, "None") else value


def _container(value: Any, where: str) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    if value is None:
        return {}
    if OmegaConf.is_dict(value):
        return cast(Dict[str, Any], OmegaConf.to_container(value, resolve=True))
    if isinstance(value, dict):
        return value
    raise ValueError(f"{where} must be a mapping of options, got {value!r}")


def _refuse_lookalike_keys(kwargs: Any) -> None:
    consequence = {
        "directpred": "the head would train with its default options (every member's options go under "
                      "method_kwargs.directpred)",
        "predictor": "the method would keep solo-learn's own predictor",
        "isoloss": "IsoLoss would use its default form",
    }
    for key in kwargs:
        meant = meant_key(str(key))
        if meant is not None:
            raise ValueError(
                f"method_kwargs.{key} is read by neither solo-learn nor directpred-plugin, and looks like "
                f"method_kwargs.{meant}: as it is, it would be ignored and {consequence[meant]}. Rename it to "
                f"{meant}, or remove it."
            )


def check_method_kwargs(method: Optional[str], cfg: Any, warn: bool = True) -> Any:
    """Validate ``method_kwargs.predictor``, its options and the loss for solo-learn method ``method``.

    Runs inside solo-learn's ``add_and_assert_specific_cfg``, before any module is built;
    stores back only validated values (see `directpred_options`) and returns ``cfg``.
    """
    kwargs = cfg.method_kwargs
    _refuse_lookalike_keys(kwargs)
    choice = selected_predictor(cfg)
    choices = predictor_choices()
    if method not in METHOD_PREDICTORS:
        given = [f"method_kwargs.{k}" for k in ("predictor", "directpred", "isoloss") if k in kwargs]
        if kwargs.get("loss") == "isoloss":
            given.append("method_kwargs.loss: isoloss")
        if given:
            raise ValueError(
                f"method {method!r} has no predictor to replace, so {', '.join(given)} cannot be "
                f"set; methods with a predictor: {sorted(METHOD_PREDICTORS)} "
                "(directpred_plugin.solo.METHOD_PREDICTORS)"
            )
        _VALIDATED[id(cfg)] = cfg
        return cfg
    if choice is not None and not (isinstance(choice, str) and choice in choices):
        raise ValueError(
            f"method_kwargs.predictor must be one of {sorted(choices)}, got {choice!r} "
            "(directpred_plugin.solo.predictor_choices())"
        )
    if closed_form(choice):
        assert choice is not None
        raw = _container(kwargs.get("directpred"), "method_kwargs.directpred")
        kwargs["directpred"] = directpred_options(raw, choice)
    elif "directpred" in kwargs and warn:
        logging.getLogger(__package__).warning(
            "method_kwargs.directpred is ignored: method_kwargs.predictor is %r", choice or MLP
        )
    _check_loss(method, choice if closed_form(choice) else None, kwargs)
    _VALIDATED[id(cfg)] = cfg
    return cfg


def _check_loss(method: str, choice: Optional[str], kwargs: Any) -> None:
    """Validate ``method_kwargs.loss`` / ``method_kwargs.isoloss`` and fill IsoLoss's defaults."""
    loss = kwargs.get("loss", "default")
    if loss not in LOSSES:
        raise ValueError(f"method_kwargs.loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss != "isoloss":
        if "isoloss" in kwargs:
            raise ValueError("method_kwargs.isoloss is set, but method_kwargs.loss is not isoloss")
        return
    if method not in ISOLOSS_METHODS:
        raise ValueError(
            f"method_kwargs.loss: isoloss is available for {sorted(ISOLOSS_METHODS)} "
            f"(directpred_plugin.solo.ISOLOSS_METHODS), not {method!r}"
        )
    if choice is None:
        raise ValueError(
            "method_kwargs.loss: isoloss needs a closed-form predictor: set method_kwargs.predictor: "
            f"directpred (or another of {list(VARIANTS)})"
        )
    options = _container(kwargs.directpred, "method_kwargs.directpred")
    head = _checked_head(choice, options)
    if head["trainable"]:
        raise ValueError(
            f"method_kwargs.loss: isoloss cannot train a trainable head (method_kwargs.predictor: {choice} "
            "with trainable: true): IsoLoss hands the loss's gradient to z directly, so W_p would get no "
            "gradient and would never be trained. Set method_kwargs.directpred.trainable: false "
            "(W_p in closed form only), or keep solo-learn's loss"
        )
    raw = _container(kwargs.get("isoloss"), "method_kwargs.isoloss")
    if set(raw) - {"form"}:
        raise ValueError(f"method_kwargs.isoloss takes only `form` (cosine or l2), got {raw!r}")
    form = raw.get("form", "cosine")
    if form not in ISOLOSS_FORMS:
        raise ValueError(f"method_kwargs.isoloss.form must be cosine or l2, got {form!r}")
    calls_per_update = options["calls_per_update"]
    if form == "cosine" and calls_per_update != AUTO:
        raise ValueError(
            f"method_kwargs.loss: isoloss (form cosine) needs method_kwargs.directpred.calls_per_update: {AUTO} "
            f"(the default), got {'null' if calls_per_update is None else calls_per_update}: with an integer the "
            "head refreshes W_p inside the step's last call, so IsoLoss's gradient would use another W_p than "
            f"the prediction did. Remove calls_per_update or set it to {AUTO}"
        )
    kwargs["isoloss"] = {"form": form}


def read_settings(method: Optional[str], cfg: Any) -> Settings:
    """What a model of ``method`` built from ``cfg`` gets (``cfg`` is checked first unless it was)."""
    if _VALIDATED.get(id(cfg)) is not cfg:
        # A subclass may override add_and_assert_specific_cfg without calling solo-learn's.
        check_method_kwargs(method, cfg, warn=False)
    choice = selected_predictor(cfg)
    if method not in METHOD_PREDICTORS or not closed_form(choice):
        return Settings()
    assert choice is not None
    kwargs = cfg.method_kwargs
    options = _container(kwargs.directpred, "method_kwargs.directpred")
    member, head = head_kwargs(choice, options)
    return Settings(
        member=member,
        head_options=head,
        isoloss_form=kwargs.isoloss.form if kwargs.get("loss", "default") == "isoloss" else None,
        log_every_n_steps=options.get("log_every_n_steps", ADAPTER_DEFAULTS["log_every_n_steps"]),
    )
