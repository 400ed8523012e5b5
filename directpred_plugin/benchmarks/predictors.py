"""The predictors every benchmark command names, in one table, with one option syntax.

:data:`PREDICTOR_SPECS` holds the closed-form family (the names of
:data:`directpred_plugin.VARIANTS`, built as ``DirectPredHead(dim, variant=name, **options)``)
and the baselines it is compared with, each entry saying which commands accept it; a
predictor is named ``name`` or ``name:key=value,...`` (``directpred:eps=0.1,freq=5``), values
Python literals (``0.1``, ``5``, ``True``, ``None``) or bare words (``refresh=iterative``).
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from directpred_plugin import VARIANTS, DirectPredHead
from directpred_plugin.variants import member_options


@dataclass(frozen=True)
class PredictorSpec:
    """How to build one predictor for projections of width ``dim``, and which commands offer it.

    ``build(dim, hidden, method, **options)``: ``hidden`` is the MLP's hidden width and
    ``method`` (``"byol"`` or ``"simsiam"``) picks lightly's head class for the MLP; a
    predictor that needs neither ignores them.
    """

    build: Callable[..., nn.Module]
    summary: str
    #: The predictor's ``W_p`` when it is one matrix (for the eigenspace alignment), else None.
    matrix: Optional[Callable[[nn.Module], Tensor]] = None
    #: options -> the ``method_kwargs`` that select this predictor in a solo-learn config (read
    #: by ``directpred_plugin.solo``); None when solo-learn's config cannot express it.
    solo_kwargs: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    #: The commands whose ``--predictors`` accept the name.
    commands: Tuple[str, ...] = ("compare", "step")


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def mlp_predictor(dim: int, hidden: Optional[int] = None, method: str = "byol", **options: Any) -> nn.Module:
    """lightly's MLP predictor of ``method``: ``BYOLPredictionHead(dim, hidden or 4 dim, dim)``, or
    for SimSiam ``SimSiamPredictionHead(dim, hidden or dim / 4, dim)``, as lightly's examples use them."""
    try:
        heads = importlib.import_module("lightly.models.modules.heads")
    except ImportError as err:
        raise ImportError(f"the MLP baseline needs lightly: pip install -e \".[bench]\" ({err})") from err
    if method == "simsiam":
        return heads.SimSiamPredictionHead(dim, hidden or max(dim // 4, 1), dim, **options)
    return heads.BYOLPredictionHead(dim, hidden or 4 * dim, dim, **options)


def _closed_form(name: str) -> Callable[..., nn.Module]:
    def build(dim: int, hidden: Optional[int] = None, method: str = "byol", **options: Any) -> nn.Module:
        # the head pools both views of an iteration into one update (its default)
        return DirectPredHead(dim, variant=name, **options)

    return build


def _solo_directpred(name: str) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    def solo_kwargs(options: Dict[str, Any]) -> Dict[str, Any]:
        # The same name in solo-learn's config, with only the options the spec gives: the
        # adapter applies the name's defaults, and pools the views of a step ("auto") as here.
        given = member_options(name, options)
        del given["variant"]  # the name says it
        return {"predictor": name, "directpred": given}

    return solo_kwargs


def _linear(dim: int, hidden: Optional[int] = None, method: str = "byol", **options: Any) -> nn.Module:
    return nn.Linear(dim, dim, bias=False, **options)


def _without_options(name: str, make: Callable[[int], nn.Module]) -> Callable[..., nn.Module]:
    def build(dim: int, hidden: Optional[int] = None, method: str = "byol", **options: Any) -> nn.Module:
        if options:
            raise ValueError(f"the {name!r} predictor takes no options, got {sorted(options)}")
        return make(dim)

    return build


#: ``speed`` times the head against the MLPs at their papers' widths, whatever the method's
#: configuration; a training has no use for them (nor for a head that never refreshes).
SPEED_ONLY = ("speed",)

#: Predictor name -> how the benchmarks build it and which commands' ``--predictors`` accept it.
PREDICTOR_SPECS: Dict[str, PredictorSpec] = {
    "mlp": PredictorSpec(mlp_predictor, "the method's MLP (Linear-BN-ReLU-Linear), trained by SGD",
                         solo_kwargs=lambda options: {"predictor": "mlp"}),  # solo-learn's own MLP
    **{name: PredictorSpec(_closed_form(name), f"DirectPredHead(variant={name!r}): {variant.summary}", _weight,
                           _solo_directpred(name), commands=("compare", "step", "speed"))
       for name, variant in VARIANTS.items()},
    "linear": PredictorSpec(_linear, "nn.Linear(dim, dim, bias=False), trained by the optimizer", _weight),
    "none": PredictorSpec(_without_options("none", lambda dim: nn.Identity()),
                          "nn.Identity(): no predictor (collapses in BYOL/SimSiam)"),
    "byol-mlp": PredictorSpec(_without_options("byol-mlp", lambda dim: mlp_predictor(dim, 4096)),
                              "BYOL's predictor: dim -> 4096 -> dim with BatchNorm and ReLU (lightly's head)",
                              commands=SPEED_ONLY),
    "simsiam-mlp": PredictorSpec(_without_options("simsiam-mlp", lambda dim: mlp_predictor(dim, method="simsiam")),
                                 "SimSiam's bottleneck predictor: dim -> dim/4 -> dim with BatchNorm and ReLU "
                                 "(lightly's head)", commands=SPEED_ONLY),
    "floor": PredictorSpec(_without_options("floor", lambda dim: DirectPredHead(dim, freq=2**62)),
                           "the head's unavoidable cost: statistics, output and backward, no refresh in the run",
                           commands=SPEED_ONLY),
}


def predictor_names(command: str) -> Tuple[str, ...]:
    """The names ``command``'s ``--predictors`` accepts, in table order."""
    return tuple(name for name, spec in PREDICTOR_SPECS.items() if command in spec.commands)


def parse_option_value(key: str, text: str) -> Any:
    """``"0.05"`` -> 0.05, ``"5"`` -> 5, ``"True"`` -> True, ``"None"`` -> None, ``"iterative"`` -> "iterative"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.isidentifier():
            return text
        raise ValueError(
            f"option {key}={text!r}: expected a number, True/False/None or a bare word (e.g. eps=0.05, freq=5, "
            "refresh=iterative)"
        ) from None


def parse_predictor_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"directpred:eps=0.1,freq=5"`` -> ``("directpred", {"eps": 0.1, "freq": 5})``."""
    name, _, rest = spec.partition(":")
    options: Dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip().isidentifier() or not value.strip():
            raise ValueError(f"predictor {spec!r}: options are written key=value separated by commas, got {item!r}")
        options[key.strip()] = parse_option_value(key.strip(), value.strip())
    return name.strip(), options


def predictor_spec(spec: str) -> PredictorSpec:
    """The registry entry of ``name[:options]``; ValueError naming the registered names."""
    name, _ = parse_predictor_spec(spec)
    if name not in PREDICTOR_SPECS:
        raise ValueError(f"unknown predictor {name!r} (in {spec!r}); expected one of {list(PREDICTOR_SPECS)}")
    return PREDICTOR_SPECS[name]


def build_predictor(spec: str, dim: int, hidden: Optional[int], method: str = "byol", **options: Any) -> nn.Module:
    """The predictor ``spec`` (``name`` or ``name:key=value,...``; ``options`` add to or override
    the spec's) for projections of width ``dim``."""
    name, spec_options = parse_predictor_spec(spec)
    return predictor_spec(spec).build(dim, hidden, method, **{**spec_options, **options})


def solo_method_kwargs(spec: str) -> Optional[Dict[str, Any]]:
    """The solo-learn ``method_kwargs`` selecting ``spec``, or None when solo-learn cannot express it."""
    name, options = parse_predictor_spec(spec)
    entry = predictor_spec(spec)
    return None if entry.solo_kwargs is None else entry.solo_kwargs(options)


def check_predictor(spec: str, command: str) -> None:
    """Fail on a bad name or option before any training or timing: a closed-form name's options
    are checked without building a head, a baseline is built once at a tiny width."""
    name, options = parse_predictor_spec(spec)
    accepted = list(predictor_names(command))
    if name not in accepted:
        known = "unknown predictor" if name not in PREDICTOR_SPECS else f"{command} does not take predictor"
        raise ValueError(f"{known} {name!r} (in {spec!r}); expected one of {accepted}")
    entry = PREDICTOR_SPECS[name]
    try:
        if name in VARIANTS:
            DirectPredHead.check_options(8, variant=name, **options)
        else:
            entry.build(8, 8, "byol", **options)
    except TypeError as error:
        raise ValueError(f"predictor {spec!r}: {error}") from error
