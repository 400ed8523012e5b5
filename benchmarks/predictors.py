"""The predictors the benchmarks compare: one registry, one factory, one option syntax.

A predictor is named on the command line as ``name`` or ``name:key=value,...``
(``directpred:eps=0.1,freq=5``); values are Python literals (``0.1``, ``5``, ``True``,
``None``) or, for string options such as ``refresh=iterative``, a bare word.
Adding a predictor is one :data:`PREDICTORS` entry.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn


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


def _mlp(dim: int, hidden: int, method: str = "byol") -> nn.Module:
    # lightly's two heads are the same Linear-BN-ReLU-Linear; each method uses its own class,
    # as lightly's examples do (SimSiam passes a bottleneck hidden width, BYOL a wide one).
    from lightly.models.modules.heads import BYOLPredictionHead, SimSiamPredictionHead

    head = SimSiamPredictionHead if method == "simsiam" else BYOLPredictionHead
    return head(dim, hidden, dim)


def _linear(dim: int, hidden: int, method: str = "byol") -> nn.Module:
    return nn.Linear(dim, dim, bias=False)


def _identity(dim: int, hidden: int, method: str = "byol") -> nn.Module:
    return nn.Identity()


def _weight(module: nn.Module) -> Tensor:
    return module.weight


def _directpred(summary: str, **defaults: Any) -> PredictorSpec:
    def build(dim: int, hidden: int, method: str = "byol", **options: Any) -> nn.Module:
        from directpred_plugin.lightly import DirectPredPredictionHead

        # Both methods call the predictor once per view; calls_per_update=2 pools both views
        # into one update per iteration, the paper's rule, with freq counting iterations.
        return DirectPredPredictionHead(dim, calls_per_update=2, **{**defaults, **options})

    def solo_kwargs(options: Dict[str, Any]) -> Dict[str, Any]:
        # solo-learn: the plugin pools the views of a training step the same way by default.
        return {"predictor": "directpred", "directpred": {**defaults, **options}}

    return PredictorSpec(build, summary, _weight, solo_kwargs)


def _solo_mlp(options: Dict[str, Any]) -> Dict[str, Any]:
    return {"predictor": "mlp"}  # solo-learn's own MLP


#: Predictor name -> how to build it. ``--predictors`` accepts every name here.
PREDICTORS: Dict[str, PredictorSpec] = {
    "mlp": PredictorSpec(_mlp, "the method's MLP (Linear-BN-ReLU-Linear), trained by SGD", solo_kwargs=_solo_mlp),
    "linear": PredictorSpec(_linear, "linear d x d (no bias), trained by SGD", _weight),
    "directpred": _directpred("DirectPred, freq 1 (closed form)"),
    "directpred-hybrid": _directpred("DirectPred every 5 iterations, SGD-trained in between", freq=5, trainable=True),
    "directcopy": _directpred("DirectCopy, freq 1 (closed form)", variant="directcopy"),
    "none": PredictorSpec(_identity, "no predictor (identity)"),
}


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
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r} (in {spec!r}); expected one of {list(PREDICTORS)}")
    return PREDICTORS[name]


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
