"""Train the tiny lightly BYOL with Lightning DDP on CPU (2 processes, gloo); every rank saves its head.

Run by tests/test_lightly.py as ``python lightly_ddp_script.py OUT_DIR [--no-sync] [--auto-no-broadcast]``
(``--auto-no-broadcast``: ``calls_per_update="auto"`` under ``DDPStrategy(broadcast_buffers=False)``,
the setting the docs suggest); Lightning re-runs this command for rank 1.
"""

import sys

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from _lightly_models import TwoViews, byol_class, quiet_trainer_options

STEPS = 4


class RecordHead(pl.Callback):
    """W_p after every step, and the first batch this rank saw."""

    def __init__(self):
        self.weights = []
        self.first_batch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.prediction_head.weight.clone())
        if self.first_batch is None:
            self.first_batch = batch[0][0].clone()


def main(out_dir, sync_dist, auto_no_broadcast):
    pl.seed_everything(0, verbose=False)
    model = byol_class(pl)(calls_per_update="auto" if auto_no_broadcast else 2, sync_dist=sync_dist)
    record = RecordHead()
    strategy = pl.strategies.DDPStrategy(broadcast_buffers=False) if auto_no_broadcast else "ddp"
    trainer = pl.Trainer(
        strategy=strategy,
        devices=2,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        callbacks=[record],
        **quiet_trainer_options(),
    )
    trainer.fit(model, DataLoader(TwoViews(), batch_size=8, shuffle=True))
    head = model.prediction_head
    gathered = trainer.strategy.all_gather(head.weight)
    torch.save(
        {
            "world_size": trainer.world_size,
            "weights": record.weights,
            "first_batch": record.first_batch,
            "state": {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)},
            "num_updates": head.num_updates.clone(),  # saved inside the extra state, read here by name
            "gathered": gathered,
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sync_dist="--no-sync" not in sys.argv[2:], auto_no_broadcast="--auto-no-broadcast" in sys.argv[2:])
