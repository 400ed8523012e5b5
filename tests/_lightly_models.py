"""A tiny BYOL LightningModule, for the lightly adapter tests.

The benchmarks' BYOL (:class:`~directpred_plugin.benchmarks.methods.LightlyBYOL`) trained
as lightly's Lightning BYOL example trains it, with an MLP backbone and fixed two-view data
so that a few steps run in well under a second on CPU.
"""

import torch
from torch import nn
from torch.utils.data import Dataset

from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.utils.scheduler import cosine_schedule

from directpred_plugin.benchmarks.methods import LightlyBYOL
from directpred_plugin.lightly import DirectPredPredictionHead

INPUT_DIM = 12
FEATURE_DIM = 16
DIM = 8


class TwoViews(Dataset):
    """Fixed inputs with two fixed noisy views each, returned as lightly's transforms do: ``((x0, x1), label)``."""

    def __init__(self, size=64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(size, INPUT_DIM, generator=gen) * torch.linspace(0.3, 2.0, INPUT_DIM)
        self.views = [base + 0.2 * torch.randn(size, INPUT_DIM, generator=gen) for _ in range(2)]
        self.labels = torch.arange(size) % 4

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.views[0][i], self.views[1][i]), self.labels[i]


def byol_class(pl):
    """The BYOL LightningModule for the Lightning flavour ``pl`` (``pytorch_lightning`` or ``lightning.pytorch``):
    the benchmarks' BYOL (one definition) with lightly's Lightning example's training step."""

    class TinyBYOL(LightlyBYOL, pl.LightningModule):
        def __init__(self, head="directpred", **head_options):
            backbone = nn.Sequential(nn.Linear(INPUT_DIM, FEATURE_DIM), nn.ReLU())
            projection_head = BYOLProjectionHead(FEATURE_DIM, 32, DIM)
            if head == "directpred":  # the MLP line below with the class renamed
                prediction_head = DirectPredPredictionHead(DIM, 32, DIM, **head_options)
            else:  # lightly's MLP, for the swap helper
                prediction_head = BYOLPredictionHead(DIM, 32, DIM)
            super().__init__(backbone, projection_head, prediction_head)

        def training_step(self, batch, batch_idx):
            self.update_target(cosine_schedule(self.current_epoch, 10, 0.996, 1))
            (x0, x1) = batch[0]
            loss, _ = self.training_loss(x0, x1)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return TinyBYOL


def quiet_trainer_options():
    return dict(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
