"""Logs the DirectPred heads' diagnostics through the solo-learn method's own ``self.log``.

Every ``method_kwargs.directpred.log_every_n_steps`` optimizer steps, at the end of the
training batch, rank 0 reads all the model's heads at once and logs
``directpred/{attribute}/{diagnostic}`` (RankMe, alignment, ...), so that the Trainer's
loggers (wandb, CSV) show them beside solo-learn's metrics.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..monitoring import head_metrics

__all__ = ["DiagnosticsLog"]


class DiagnosticsLog:
    """When and what a model logs of its heads ``attrs``; ``every_n_steps=0`` logs nothing."""

    def __init__(self, every_n_steps: int, attrs: Sequence[str]) -> None:
        self.every_n_steps = every_n_steps
        self.attrs = list(attrs)
        self._last_logged_step = -1

    def after_batch(self, model: Any) -> None:
        """Log if this batch ended an optimizer step due for logging (``model.on_train_batch_end``)."""
        trainer = getattr(model, "_trainer", None)  # None: not attached to a Trainer
        if not self.every_n_steps or not self.attrs or trainer is None:
            return
        step = trainer.global_step
        # Under gradient accumulation several batches end with the same step: log it once, and not step 0.
        if step == 0 or step == self._last_logged_step or step % self.every_n_steps:
            return
        self._last_logged_step = step
        if not trainer.is_global_zero:  # loggers write on rank 0 only; with sync_dist the heads agree
            return
        metrics = head_metrics([(attr, getattr(model, attr)) for attr in self.attrs])
        # Host tensors: Lightning keeps a logged value on its tensor's device, so writing them reads no device.
        model.log_dict({name: torch.tensor(value, dtype=torch.float64) for name, value in metrics.items()},
                       on_step=True, on_epoch=False, rank_zero_only=True)
