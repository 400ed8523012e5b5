"""``DirectPredDiagnostics``: the Lightning callback that logs every DirectPred head's diagnostics.

One class for both Lightning flavours: it derives from ``lightning.pytorch.Callback`` and
``pytorch_lightning.Callback``, whichever are installed, so either ``Trainer`` accepts it
(each checks ``isinstance``). Importing this module needs at least one of them.
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from .lightly import INSTALL_HINT
from .monitoring import head_metrics, named_heads

try:
    from lightning.pytorch import Callback as LightningCallback
except ImportError:
    class LightningCallback:  # type: ignore[no-redef]
        """Stands in for ``lightning.pytorch.Callback`` where only ``pytorch_lightning`` is installed."""

try:
    from pytorch_lightning import Callback as PytorchLightningCallback
except ImportError:
    class PytorchLightningCallback:  # type: ignore[no-redef]
        """Stands in for ``pytorch_lightning.Callback`` where only ``lightning`` is installed."""

if LightningCallback.__module__ == PytorchLightningCallback.__module__ == __name__:
    raise ImportError(
        "DirectPredDiagnostics is a Lightning callback and needs `lightning` or `pytorch_lightning`, "
        f"neither of which could be imported. Install them with: {INSTALL_HINT}"
    )

__all__ = ["DirectPredDiagnostics"]


# Each base types its hooks with its own flavour's Trainer, so mypy sees the two as incompatible;
# at run time a hook receives one flavour's objects and uses only what both have.
class DirectPredDiagnostics(LightningCallback, PytorchLightningCallback):  # type: ignore[misc]
    """Lightning callback logging the diagnostics of every DirectPredHead in the model.

    Every ``every_n_steps`` optimizer steps it logs `DirectPredHead.diagnostics`
    (RankMe of the projections, eigenspace alignment, spectrum summary of ``F_hat`` and
    ``W_p``, update and skip counters) through all of the Trainer's loggers, as
    ``{prefix}/{head name}/{diagnostic}`` at ``step=trainer.global_step``, with one read
    from the device for all heads. Under DDP only rank 0 computes and logs (the heads hold
    the same state on every rank).

    Args:
        every_n_steps: Log when ``trainer.global_step`` is a multiple of this. Each time costs
            two float64 eigendecompositions per head.
        prefix: First component of the metric names.

    Raises (at ``trainer.fit``):
        ValueError: the Trainer has no logger, or the model has no DirectPredHead.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[DirectPredDiagnostics(every_n_steps=100)])
    """

    def __init__(self, every_n_steps: int = 50, prefix: str = "directpred") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        super().__init__()
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._last_logged_step = -1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise ValueError(
                "DirectPredDiagnostics logs through the Trainer's logger, but the Trainer has none "
                "(logger=False). Give it a logger, e.g. Trainer(logger=CSVLogger('logs'))."
            )
        if not named_heads(pl_module):
            raise ValueError(
                f"DirectPredDiagnostics found no DirectPredHead in {type(pl_module).__name__}; use "
                "DirectPredPredictionHead as the prediction head or call replace_prediction_heads first."
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
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
        return head_metrics(named_heads(pl_module), self.prefix)
