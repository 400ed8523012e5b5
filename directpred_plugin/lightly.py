"""lightly adapter: DirectPred as a drop-in for lightly's prediction heads.

- `DirectPredPredictionHead`: the one-line replacement for ``BYOLPredictionHead`` /
  ``SimSiamPredictionHead`` (needs neither lightly nor Lightning).
- `replace_prediction_heads`: swap the prediction heads of an existing model in place.
- `DirectPredDiagnostics`: a Lightning callback logging
  the heads' diagnostics (defined in `directpred_plugin.callbacks`, re-exported here).

lightly and Lightning are imported only by the parts that need them; they come with the
package's ``lightly`` extra (see `INSTALL_HINT`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

from torch import nn

from .head import DirectPredHead
from .replacing import replaced_width
from .variants import member_options

#: How to get the ``lightly`` extra; the package is not on PyPI yet.
INSTALL_HINT = (
    'pip install -e ".[lightly]" in a checkout of directpred-plugin, '
    'or pip install "directpred-plugin[lightly] @ git+<repository URL>"'
)

#: Names of the classes in ``lightly.models.modules.heads`` that `replace_prediction_heads`
#: swaps by default. BYOL's and SimSiam's predictors (FastSiam reuses SimSiam's) are the
#: setting the paper analyses: a square map on the online branch only, regressed onto a
#: stop-gradient target. NNCLR's predictor has the same place and shape but a contrastive
#: loss, so swapping it is outside the paper's analysis, yet the same one-line change.
#: ``SMoGPredictionHead`` is left out: its output only feeds logits against cluster
#: prototypes (a cross-entropy over group assignments), for which DirectPred's closed form
#: has no derivation; pass it in ``head_types`` to swap it anyway.
LIGHTLY_PREDICTION_HEADS: Tuple[str, ...] = (
    "BYOLPredictionHead",
    "SimSiamPredictionHead",
    "NNCLRPredictionHead",
)


class DirectPredPredictionHead(DirectPredHead):
    """Prediction head for BYOL/SimSiam set in closed form by DirectPred [0].

    A drop-in for lightly's ``BYOLPredictionHead``, ``SimSiamPredictionHead`` and
    ``NNCLRPredictionHead``: it takes their positional signature
    ``(input_dim, hidden_dim, output_dim)``, so swapping is renaming the class. It maps
    ``input_dim`` to ``input_dim`` with ``W_p`` computed from the correlation of its input
    instead of an MLP trained by gradient, and has no parameters for the optimizer (unless
    ``trainable=True``).

    By default the head makes one update per optimizer step, pooled over all the views (and
    accumulated batches) the step predicts (lightly's BYOL and SimSiam call the head once per
    view), as the paper and the authors' code do.

    - [0]: Tian, Chen & Ganguli, "Understanding self-supervised learning dynamics
      without contrastive pairs", ICML 2021, https://arxiv.org/abs/2102.06810

    Args:
        input_dim: Width of the projections the head predicts from (and of its output).
            Required: lightly's heads default to different widths (256 for BYOL, 2048 for SimSiam).
        hidden_dim: Ignored: DirectPred has no hidden layer. Accepted so that the MLP
            head's arguments can stay as they are.
        output_dim: Must equal ``input_dim`` if given (``W_p`` is square).
        **options: Any other `DirectPredHead` option (``rho``, ``eps``, ``freq``, ...).

    Examples:
        >>> # BYOL: was BYOLPredictionHead(256, 4096, 256)
        >>> prediction_head = DirectPredPredictionHead(256, 4096, 256)
        >>> # SimSiam: was SimSiamPredictionHead(2048, 512, 2048)
        >>> prediction_head = DirectPredPredictionHead(2048, 512, 2048)
    """

    def __init__(
        self,
        input_dim: Optional[int] = None,
        hidden_dim: Optional[int] = None,
        output_dim: Optional[int] = None,
        **options: Any,
    ) -> None:
        del hidden_dim  # the MLP's width; DirectPred has no hidden layer
        if input_dim is None:
            raise TypeError(
                "DirectPredPredictionHead needs input_dim, the width of the projections it predicts from: "
                "lightly's BYOLPredictionHead() and NNCLRPredictionHead() default to 256, "
                "SimSiamPredictionHead() to 2048, so no one default fits the head it replaces. "
                "Write e.g. DirectPredPredictionHead(2048) for SimSiam, DirectPredPredictionHead(256) for BYOL."
            )
        if output_dim is not None and output_dim != input_dim:
            raise ValueError(
                f"DirectPredPredictionHead maps input_dim to itself (got input_dim={input_dim}, "
                f"output_dim={output_dim}): W_p = U diag(p) U^T is built from the eigenvectors of "
                "the input's own correlation, so it is square. Set output_dim=input_dim or leave it out."
            )
        super().__init__(input_dim, **options)


# --------------------------------------------------------------------------- swap helper
class ReplacedHead(NamedTuple):
    """One head swapped by `replace_prediction_heads`."""

    name: str
    """Qualified name of the head in the model (the first one, if it is registered twice)."""
    old: nn.Module
    """The head that was removed."""
    new: DirectPredPredictionHead
    """The head now in its place."""


def lightly_prediction_head_types() -> Tuple[Type[nn.Module], ...]:
    """lightly's classes named in `LIGHTLY_PREDICTION_HEADS` (imports lightly)."""
    try:
        heads = importlib.import_module("lightly.models.modules.heads")
    except ImportError as err:
        raise ImportError(
            "Finding lightly's prediction heads requires the lightly package, which could not be "
            f"imported ({err}). Install it with: {INSTALL_HINT}"
        ) from err
    return tuple(getattr(heads, name) for name in LIGHTLY_PREDICTION_HEADS)


def replace_prediction_heads(
    model: nn.Module,
    *,
    head_types: Union[Type[nn.Module], Sequence[Type[nn.Module]], None] = None,
    predictor: str = "directpred",
    **options: Any,
) -> List[ReplacedHead]:
    """Replace, in place, every lightly prediction head of ``model`` by a DirectPred head.

    For models whose class you cannot edit. Each head that is an instance of
    ``head_types`` (default: lightly's ``BYOLPredictionHead``, ``SimSiamPredictionHead``
    and ``NNCLRPredictionHead``) is swapped for a `DirectPredPredictionHead` whose
    width is the ``in_features`` of the head's first ``nn.Linear``; the head must map that
    width onto itself. The new head is put on the old one's device and in its
    train/eval mode; a head registered under several names is replaced by one shared
    DirectPred head everywhere.

    Call it before the optimizer is built (for a LightningModule: before
    ``trainer.fit``), since the removed MLP's parameters must not be optimized.

    Args:
        model: The model to modify.
        head_types: A class, or a sequence of classes, to replace instead of lightly's
            predictors. Giving them means lightly need not be installed.
        predictor: Which closed-form predictor replaces them: a name of
            `directpred_plugin.VARIANTS` (``"directpred"``, ``"directcopy"``, ``"ns"``,
            ...), with that name's defaults.
        **options: `DirectPredHead` options for every new head, e.g. ``rho=0.5``.

    Returns:
        One `ReplacedHead` ``(name, old, new)`` per replaced head, in module order.

    Raises:
        ImportError: ``head_types`` not given and lightly not installed.
        ValueError: ``model`` is itself such a head, has none of them (and no DirectPred
            head already: it would train its own predictor unchanged), or a head has no
            ``nn.Linear`` or does not map its width onto itself.

    Examples:
        >>> model = BYOL()  # any model built with lightly's BYOLPredictionHead(256, 4096, 256)
        >>> replaced = replace_prediction_heads(model)
        >>> [(r.name, r.new.dim) for r in replaced]
        [('prediction_head', 256)]
    """
    options = member_options(predictor, options)
    if head_types is None:
        types = lightly_prediction_head_types()
    elif isinstance(head_types, type):
        types = (head_types,)  # as isinstance() accepts one class or several
    else:
        types = tuple(head_types)
    if not types or not all(isinstance(t, type) for t in types):
        raise ValueError(f"head_types must be a non-empty sequence of classes, got {head_types!r}")
    if isinstance(model, types):
        raise ValueError(
            f"model is itself a {type(model).__name__}, so it cannot be replaced in place; "
            "use DirectPredPredictionHead(input_dim) in its stead."
        )

    replacements: Dict[int, ReplacedHead] = {}
    locations: List[Tuple[str, int]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, types) or isinstance(module, DirectPredHead):
            continue
        if any(name.startswith(outer + ".") for outer, _ in locations):
            continue  # inside a head that is being replaced as a whole
        if id(module) not in replacements:
            replacements[id(module)] = ReplacedHead(name, module, _direct_pred_like(name, module, options))
        locations.append((name, id(module)))

    if not locations and not any(isinstance(m, DirectPredHead) for m in model.modules()):
        raise ValueError(
            f"replace_prediction_heads found no {' or '.join(t.__name__ for t in types)} in "
            f"{type(model).__name__}, so the model would keep training its own predictor. Name the class of its "
            "prediction head with head_types= (e.g. head_types=SMoGPredictionHead), or build the model with "
            "DirectPredPredictionHead."
        )
    for name, key in locations:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, replacements[key].new)
    return list(replacements.values())


def _direct_pred_like(name: str, head: nn.Module, options: Dict[str, Any]) -> DirectPredPredictionHead:
    try:
        new = DirectPredPredictionHead(replaced_width(head), **options)
    except ValueError as err:
        raise ValueError(f"cannot replace {name!r} ({type(head).__name__}): {err}") from err
    # Statistics keep their dtype; only a trainable W_p follows the old head's dtype.
    reference = next(head.parameters())
    new.to(device=reference.device, dtype=reference.dtype)
    return new.train(head.training)


if TYPE_CHECKING:
    from .callbacks import DirectPredDiagnostics


def __getattr__(name: str) -> Any:
    # Imported on first access, so that this module imports without either Lightning flavour.
    if name == "DirectPredDiagnostics":
        from .callbacks import DirectPredDiagnostics

        return DirectPredDiagnostics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(list(globals()) + ["DirectPredDiagnostics"])


__all__ = [
    "DirectPredPredictionHead",
    "DirectPredDiagnostics",
    "ReplacedHead",
    "replace_prediction_heads",
    "lightly_prediction_head_types",
    "LIGHTLY_PREDICTION_HEADS",
    "INSTALL_HINT",
]
