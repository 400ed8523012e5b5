"""A predictor by name: one registry (:data:`PREDICTORS`) and one factory (:func:`create_predictor`).

The lightly adapter, the solo-learn adapter and the benchmarks all build predictors here,
so a name means the same module everywhere. Every member of the closed-form family
(:data:`directpred_plugin.VARIANTS`) is registered under its variant name; the baselines
the benchmarks compare against (``mlp``, ``simsiam-mlp``, ``linear``, ``none``) sit beside
them, so that "a predictor" is one kind of thing with one factory.

Examples:
    >>> create_predictor("directpred", 256)                  # DirectPredHead(256)
    >>> create_predictor("ns", 256)                          # Newton-Schulz, per-batch statistics
    >>> create_predictor("directpred", 256, eps=0.1, freq=5)  # any DirectPredHead option
    >>> create_predictor("mlp", 256, hidden_dim=4096)         # lightly's BYOLPredictionHead
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

from torch import nn

from .head import DirectPredHead
from .rules import VARIANTS

__all__ = [
    "PredictorEntry",
    "PREDICTORS",
    "register_predictor",
    "create_predictor",
    "closed_form_predictors",
    "closed_form_options",
]


@dataclass(frozen=True)
class PredictorEntry:
    """How one named predictor is built: ``build(dim, hidden_dim, **options)``."""

    build: Callable[..., nn.Module]
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Options applied before the caller's (the caller's win)."""
    closed_form: bool = False
    """A :class:`DirectPredHead` (statistics, no gradient-trained MLP); takes its options."""


#: Predictors by name; add one with :func:`register_predictor`.
PREDICTORS: Dict[str, PredictorEntry] = {}


def register_predictor(
    name: str,
    build: Callable[..., nn.Module],
    summary: str,
    *,
    defaults: Optional[Mapping[str, Any]] = None,
    closed_form: bool = False,
) -> None:
    """Register ``build(dim, hidden_dim, **options) -> nn.Module`` under ``name``."""
    if name in PREDICTORS:
        raise ValueError(f"a predictor named {name!r} is already registered")
    PREDICTORS[name] = PredictorEntry(build, summary, dict(defaults or {}), closed_form)


def create_predictor(name: str, dim: int, *, hidden_dim: Optional[int] = None, **options: Any) -> nn.Module:
    """The predictor registered as ``name`` for projections of width ``dim``.

    ``hidden_dim`` is the hidden width of the MLP baselines (ignored by closed-form
    predictors, which map ``dim`` to itself); ``options`` go to the predictor
    (:class:`DirectPredHead` options for the closed-form family) over the entry's defaults.
    """
    try:
        entry = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; registered predictors: {sorted(PREDICTORS)}") from None
    if entry.closed_form:
        _check_variant(name, options)
        options = {key: value for key, value in options.items() if key != "variant"}
    return entry.build(dim, hidden_dim, **{**entry.defaults, **options})


def closed_form_options(name: str, **options: Any) -> Dict[str, Any]:
    """The :class:`DirectPredHead` options ``create_predictor(name, ...)`` would use, variant included.

    For adapters that build their own :class:`DirectPredHead` subclass (lightly's
    ``DirectPredPredictionHead``) or fill a config (solo-learn) from a predictor name.
    """
    entry = PREDICTORS.get(name)
    if entry is None or not entry.closed_form:
        raise ValueError(f"{name!r} is not a closed-form predictor; closed-form predictors: {closed_form_predictors()}")
    _check_variant(name, options)
    return {**entry.defaults, **options, "variant": _VARIANT_OF.get(name, name)}


def _check_variant(name: str, options: Mapping[str, Any]) -> None:
    # The name picks the variant and its defaults; another variant under this name would be
    # that variant with this name's defaults, a module no name stands for.
    variant = _VARIANT_OF.get(name, name)
    if "variant" in options and options["variant"] != variant:
        raise ValueError(
            f"predictor {name!r} is variant {variant!r}, got variant={options['variant']!r}; "
            f"name the member instead (one of {closed_form_predictors()})"
        )


def closed_form_predictors() -> List[str]:
    """Names of the registered closed-form predictors, in registration order."""
    return [name for name, entry in PREDICTORS.items() if entry.closed_form]


def _closed_form(variant: str) -> Callable[..., nn.Module]:
    def build(dim: int, hidden_dim: Optional[int], **options: Any) -> nn.Module:
        return DirectPredHead(dim, variant=variant, **options)

    return build


def _lightly_head(class_name: str, hidden: Callable[[int], int]) -> Callable[..., nn.Module]:
    def build(dim: int, hidden_dim: Optional[int], **options: Any) -> nn.Module:
        try:
            heads = importlib.import_module("lightly.models.modules.heads")
        except ImportError as err:
            raise ImportError(
                f"the {class_name} baseline needs lightly: pip install lightly ({err})"
            ) from err
        return getattr(heads, class_name)(dim, hidden_dim or hidden(dim), dim, **options)

    return build


def _linear(dim: int, hidden_dim: Optional[int], **options: Any) -> nn.Module:
    return nn.Linear(dim, dim, bias=False, **options)


def _identity(dim: int, hidden_dim: Optional[int], **options: Any) -> nn.Module:
    if options:
        raise ValueError(f"the 'none' predictor takes no options, got {sorted(options)}")
    return nn.Identity()


# Edge of Orthogonality: statistics of the current batch (no EMA on them) and the pure rule.
_MATMUL_DEFAULTS = {"rho": 0.0, "eps": 0.0}

for _name, _variant in VARIANTS.items():
    register_predictor(
        _name,
        _closed_form(_name),
        f"DirectPredHead(variant={_name!r}): {_variant.summary}",
        defaults=_MATMUL_DEFAULTS if _variant.spectral_power is None else None,
        closed_form=True,
    )
#: Closed-form names that are not a variant's own name.
_VARIANT_OF = {"directpred-hybrid": "directpred"}

register_predictor(
    "directpred-hybrid",
    _closed_form("directpred"),
    "DirectPred refreshed every 5 steps and trained by the optimizer in between (the paper's hybrid)",
    defaults={"freq": 5, "trainable": True},
    closed_form=True,
)
register_predictor("mlp", _lightly_head("BYOLPredictionHead", lambda d: 4 * d),
                   "lightly's BYOLPredictionHead(dim, hidden, dim): Linear-BN-ReLU-Linear, hidden 4*dim by default")
register_predictor("simsiam-mlp", _lightly_head("SimSiamPredictionHead", lambda d: max(d // 4, 1)),
                   "lightly's SimSiamPredictionHead(dim, hidden, dim): bottleneck MLP, hidden dim/4 by default")
register_predictor("linear", _linear, "nn.Linear(dim, dim, bias=False), trained by the optimizer")
register_predictor("none", _identity, "nn.Identity(): no predictor (collapses in BYOL/SimSiam)")
