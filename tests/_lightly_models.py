"""A tiny BYOL LightningModule built from lightly's modules, for the lightly adapter tests.

It has the shape of lightly's Lightning BYOL example (backbone, BYOL projection head,
prediction head, EMA target updated with lightly's helpers) with an MLP backbone and
fixed two-view data so that a few steps run in well under a second on CPU.
"""

import copy

import torch
from torch import nn
from torch.utils.data import Dataset

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule

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
    """The BYOL LightningModule for the Lightning flavour ``pl`` (``pytorch_lightning`` or ``lightning.pytorch``)."""

    class TinyBYOL(pl.LightningModule):
        def __init__(self, head="directpred", **head_options):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(INPUT_DIM, FEATURE_DIM), nn.ReLU())
            self.projection_head = BYOLProjectionHead(FEATURE_DIM, 32, DIM)
            if head == "directpred":  # the MLP line below with the class renamed
                self.prediction_head = DirectPredPredictionHead(DIM, 32, DIM, **head_options)
            else:  # lightly's MLP, for the swap helper
                self.prediction_head = BYOLPredictionHead(DIM, 32, DIM)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)
            self.criterion = NegativeCosineSimilarity()

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x)).detach()

        def training_step(self, batch, batch_idx):
            momentum = cosine_schedule(self.current_epoch, 10, 0.996, 1)
            update_momentum(self.backbone, self.backbone_momentum, m=momentum)
            update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
            (x0, x1) = batch[0]
            p0, z0 = self.forward(x0), self.forward_momentum(x0)
            p1, z1 = self.forward(x1), self.forward_momentum(x1)
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
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
