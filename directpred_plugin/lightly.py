"""lightly adapter: DirectPred as a drop-in for lightly's prediction heads.

- :class:`DirectPredPredictionHead`: the one-line replacement for ``BYOLPredictionHead`` /
  ``SimSiamPredictionHead`` (needs neither lightly nor Lightning).
- :func:`replace_prediction_heads`: swap the prediction heads of an existing model in place.
- ``DirectPredDiagnostics``: a Lightning callback logging the heads' diagnostics.

lightly and Lightning are imported only by the parts that need them; they come with the
package's ``lightly`` extra (see :data:`INSTALL_HINT`).
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

from torch import nn

from .head import DirectPredHead
from .variants import VARIANTS

#: How to get the ``lightly`` extra; the package is not on PyPI yet.
INSTALL_HINT = (
    'pip install -e ".[lightly]" in a checkout of directpred-plugin, '
    'or pip install "directpred-plugin[lightly] @ git+<repository URL>"'
)

#: Names of the classes in ``lightly.models.modules.heads`` that :func:`replace_prediction_heads`
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

# Import names of the two Lightning flavours a DirectPredDiagnostics must satisfy.
_LIGHTNING_FLAVOURS: Tuple[str, ...] = ("lightning.pytorch", "pytorch_lightning")


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
        **options: Any other :class:`DirectPredHead` option (``rho``, ``eps``, ``freq``, ...).

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
    """One head swapped by :func:`replace_prediction_heads`."""

    name: str
    """Qualified name of the head in the model (the first one, if it is registered twice)."""
    old: nn.Module
    """The head that was removed."""
    new: DirectPredPredictionHead
    """The head now in its place."""


def lightly_prediction_head_types() -> Tuple[Type[nn.Module], ...]:
    """lightly's classes named in :data:`LIGHTLY_PREDICTION_HEADS` (imports lightly)."""
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
    and ``NNCLRPredictionHead``) is swapped for a :class:`DirectPredPredictionHead` whose
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
            :data:`directpred_plugin.VARIANTS` (``"directpred"``, ``"directcopy"``, ``"ns"``,
            ...), with that name's defaults.
        **options: :class:`DirectPredHead` options for every new head, e.g. ``rho=0.5``.

    Returns:
        One :class:`ReplacedHead` ``(name, old, new)`` per replaced head, in module order.

    Raises:
        ImportError: ``head_types`` not given and lightly not installed.
        ValueError: ``model`` is itself such a head, or a head has no ``nn.Linear`` or
            does not map its width onto itself.

    Examples:
        >>> model = BYOL()  # any model built with lightly's BYOLPredictionHead(256, 4096, 256)
        >>> replaced = replace_prediction_heads(model)
        >>> [(r.name, r.new.dim) for r in replaced]
        [('prediction_head', 256)]
    """
    if predictor not in VARIANTS:
        raise ValueError(f"predictor must be one of {list(VARIANTS)}, got {predictor!r}")
    if options.get("variant", predictor) != predictor:
        raise ValueError(f"predictor={predictor!r} names the variant; got variant={options['variant']!r} as well")
    options = {**options, "variant": predictor}
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

    for name, key in locations:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, replacements[key].new)
    return list(replacements.values())


def _direct_pred_like(name: str, head: nn.Module, options: Dict[str, Any]) -> DirectPredPredictionHead:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot replace {name!r} ({type(head).__name__}): it has no nn.Linear to read its width from")
    first, last = linears[0], linears[-1]
    try:
        new = DirectPredPredictionHead(first.in_features, output_dim=last.out_features, **options)
    except ValueError as err:
        raise ValueError(f"cannot replace {name!r} ({type(head).__name__}): {err}") from err
    # Statistics keep their dtype; only a trainable W_p follows the old head's dtype.
    new.to(device=first.weight.device, dtype=first.weight.dtype)
    return new.train(head.training)


# ---------------------------------------------------------------- diagnostics callback
class _DiagnosticsHooks:
    """The behaviour of ``DirectPredDiagnostics``; the Lightning base classes are added lazily."""

    def __init__(self, every_n_steps: int = 50, prefix: str = "directpred") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        super().__init__()
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._last_logged_step = -1

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise ValueError(
                "DirectPredDiagnostics logs through the Trainer's logger, but the Trainer has none "
                "(logger=False). Give it a logger, e.g. Trainer(logger=CSVLogger('logs'))."
            )
        if not _direct_pred_heads(pl_module):
            raise ValueError(
                f"DirectPredDiagnostics found no DirectPredHead in {type(pl_module).__name__}; use "
                "DirectPredPredictionHead as the prediction head or call replace_prediction_heads first."
            )

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches share a step (and step 0 lasts until
        # the first optimizer step): log each step once, and not step 0.
        if step == 0 or step == self._last_logged_step or step % self.every_n_steps != 0:
            return
        self._last_logged_step = step
        if not trainer.is_global_zero:  # loggers write on rank 0 only; with sync_dist the heads agree
            return
        metrics = self.metrics(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def metrics(self, pl_module: nn.Module) -> Dict[str, float]:
        """``{prefix}/{head name}/{diagnostic}`` for every DirectPredHead of ``pl_module``."""
        return {
            f"{self.prefix}/{name}/{key}": value
            for name, head in _direct_pred_heads(pl_module)
            for key, value in head.diagnostics().items()
        }


def _direct_pred_heads(module: nn.Module) -> List[Tuple[str, DirectPredHead]]:
    return [(name or "head", m) for name, m in module.named_modules() if isinstance(m, DirectPredHead)]


@functools.lru_cache(maxsize=None)
def _diagnostics_callback_class() -> type:
    bases = []
    for flavour in _LIGHTNING_FLAVOURS:
        try:
            bases.append(importlib.import_module(flavour).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "DirectPredDiagnostics is a Lightning callback and needs `lightning` or `pytorch_lightning`, "
            f"neither of which could be imported. Install them with: {INSTALL_HINT}"
        )
    # Subclassing the Callback of every installed flavour lets the same class go to a
    # `lightning.pytorch.Trainer` or a `pytorch_lightning.Trainer` (each checks isinstance).
    return type(
        "DirectPredDiagnostics",
        (_DiagnosticsHooks, *bases),
        {"__module__": __name__, "__qualname__": "DirectPredDiagnostics", "__doc__": _DIAGNOSTICS_DOC},
    )


_DIAGNOSTICS_DOC = """Lightning callback logging the diagnostics of every DirectPredHead in the model.

Every ``every_n_steps`` optimizer steps it logs :meth:`DirectPredHead.diagnostics` (spectrum
summary of ``F_hat`` and ``W_p``, eigenspace alignment, collapse indicator, update and skip
counters) through all of the Trainer's loggers, as ``{prefix}/{head name}/{diagnostic}`` at
``step=trainer.global_step``. Under DDP only rank 0 computes and logs (the heads hold the
same state on every rank). It is accepted by both ``lightning.pytorch.Trainer`` and
``pytorch_lightning.Trainer``.

Args:
    every_n_steps: Log when ``trainer.global_step`` is a multiple of this. Each call costs
        two eigendecompositions per head.
    prefix: First component of the metric names.

Raises (at ``trainer.fit``):
    ValueError: the Trainer has no logger, or the model has no DirectPredHead.

Examples:
    >>> trainer = pl.Trainer(callbacks=[DirectPredDiagnostics(every_n_steps=100)])
"""


if TYPE_CHECKING:
    from lightning.pytorch import Callback as _LightningCallback

    class DirectPredDiagnostics(_DiagnosticsHooks, _LightningCallback):
        """What :func:`_diagnostics_callback_class` builds, as type checkers should see it."""


def __getattr__(name: str) -> Any:
    # Built on first access so that importing this module needs neither Lightning flavour.
    if name == "DirectPredDiagnostics":
        return _diagnostics_callback_class()
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
