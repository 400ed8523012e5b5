"""The predictors the benchmarks compare: one registry, one factory, one option syntax.

A predictor is named on the command line as ``name`` or ``name:key=value,...``
(``directpred:eps=0.1,freq=5``); values are Python literals (``0.1``, ``5``, ``True``,
``None``) or, for string options such as ``refresh=iterative``, a bare word.
The names are those of the package's registry (:func:`directpred_plugin.create_predictor`):
registering a predictor there makes it available here.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from directpred_plugin.predictors import PREDICTORS as PACKAGE_PREDICTORS
from directpred_plugin.predictors import closed_form_options, create_predictor


@dataclass(frozen=True)
class PredictorSpec:
    """How to build one predictor for projections of width ``dim``.

    ``build(dim, hidden, method, **options)``: ``hidden`` is the MLP's hidden width and
    ``method`` (``"byol"`` or ``"simsiam"``) picks lightly's head class for the MLP.
    """

    build: Callable[..., nn.Module]
    summary: str
    #: The predictor's ``W_p`` when it is one matrix (for the eigenspace alignment), else None.
    matrix: Optional[Callable[[nn.Module], Tensor]] = None
    #: options -> the ``method_kwargs`` that select this predictor in a solo-learn config (read
    #: by ``directpred_plugin.solo``); None when solo-learn's config cannot express it.
    solo_kwargs: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None


def _weight(module: nn.Module) -> Tensor:
    return module.weight


def _build(name: str) -> Callable[..., nn.Module]:
    def build(dim: int, hidden: int, method: str = "byol", **options: Any) -> nn.Module:
        if name == "mlp":  # each method uses its own lightly class, as lightly's examples do
            return create_predictor("simsiam-mlp" if method == "simsiam" else "mlp", dim, hidden_dim=hidden, **options)
        # closed-form heads pool both views of an iteration into one update (the head's default)
        return create_predictor(name, dim, hidden_dim=hidden, **options)

    return build


def _solo_directpred(name: str) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    def solo_kwargs(options: Dict[str, Any]) -> Dict[str, Any]:
        # The same name in solo-learn's config, with only the options the spec gives: the
        # adapter applies the name's defaults as create_predictor does, and pools the views of
        # a training step ("auto") as _build does here.
        closed_form_options(name, **options)  # a variant that contradicts the name fails here
        return {"predictor": name, "directpred": dict(options)}

    return solo_kwargs


def _solo_mlp(options: Dict[str, Any]) -> Dict[str, Any]:
    return {"predictor": "mlp"}  # solo-learn's own MLP


def _spec(name: str) -> PredictorSpec:
    entry = PACKAGE_PREDICTORS[name]
    if name == "mlp":
        return PredictorSpec(_build(name), "the method's MLP (Linear-BN-ReLU-Linear), trained by SGD", solo_kwargs=_solo_mlp)
    if entry.closed_form:
        return PredictorSpec(_build(name), entry.summary, _weight, _solo_directpred(name))
    return PredictorSpec(_build(name), entry.summary, _weight if name == "linear" else None)


#: Predictor name -> how the benchmarks build it: a view of the package's one registry
#: (:data:`directpred_plugin.PREDICTORS`), where ``mlp`` means the method's own MLP.
#: ``--predictors`` accepts every name here.
PREDICTOR_SPECS: Dict[str, PredictorSpec] = {
    name: _spec(name) for name in PACKAGE_PREDICTORS if name != "simsiam-mlp"
}


def __getattr__(name: str) -> Any:
    if name == "PREDICTORS":  # the old name, which the package's registry also has
        warnings.warn("benchmarks.predictors.PREDICTORS is now PREDICTOR_SPECS", DeprecationWarning, stacklevel=2)
        return PREDICTOR_SPECS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def build_predictor(spec: str, dim: int, hidden: int, method: str = "byol", **options: Any) -> nn.Module:
    """The predictor ``spec`` (``name`` or ``name:key=value,...``; ``options`` add to or override
    the spec's) for projections of width ``dim``."""
    name, spec_options = parse_predictor_spec(spec)
    return predictor_spec(spec).build(dim, hidden, method, **{**spec_options, **options})


def solo_method_kwargs(spec: str) -> Optional[Dict[str, Any]]:
    """The solo-learn ``method_kwargs`` selecting ``spec``, or None when solo-learn cannot express it."""
    name, options = parse_predictor_spec(spec)
    entry = predictor_spec(spec)
    return None if entry.solo_kwargs is None else entry.solo_kwargs(options)


def check_predictor(spec: str) -> None:
    """Build ``spec`` once at a tiny width so that bad names or options fail before any training."""
    name, options = parse_predictor_spec(spec)
    entry = predictor_spec(spec)
    try:
        entry.build(8, 8, "byol", **options)
    except TypeError as error:
        raise ValueError(f"predictor {spec!r}: {error}") from error
