"""BYOL with a DirectPred prediction head, in the shape of lightly's Lightning BYOL example.

The model is lightly's BYOL (ResNet-18 backbone, BYOL projection head, EMA target) with
its 256-1024-256 MLP predictor replaced by DirectPredPredictionHead: see the diff in this
folder's README. Runs offline on scikit-learn's digits by default, or on CIFAR-10:

    python byol.py                                        # digits, CPU or GPU
    python byol.py --dataset cifar10 --download        # into ./data (--data-dir)
    python byol.py --devices 2 --strategy ddp             # multi-GPU (or CPU) DDP

Requires directpred-plugin with its lightly extra, and scikit-learn; from this folder of a
checkout: pip install -e "../..[lightly]" scikit-learn
"""

import copy

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.byol_transform import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
)
from lightly.utils.scheduler import cosine_schedule

from directpred_plugin.lightly import DirectPredPredictionHead

from _recipe import augmentation_options, fit


class BYOL(pl.LightningModule):
    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = BYOLProjectionHead(512, 1024, 256)
        # lightly's example: BYOLPredictionHead(256, 1024, 256). The hidden width is unused.
        self.prediction_head = DirectPredPredictionHead(256, 1024, 256)

        # Target network: an EMA copy of the online backbone and projection head.
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        features = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(features)
        return self.prediction_head(z)

    def forward_momentum(self, x):
        features = self.backbone_momentum(x).flatten(start_dim=1)
        z = self.projection_head_momentum(features)
        return z.detach()

    def training_step(self, batch, batch_idx):
        momentum = cosine_schedule(self.current_epoch, self.trainer.max_epochs, 0.996, 1)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        (x0, x1) = batch[0]
        p0 = self.forward(x0)
        z0 = self.forward_momentum(x0)
        p1 = self.forward(x1)
        z1 = self.forward_momentum(x1)
        # Each view's prediction regresses the target projection of the other view.
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The DirectPred head has no parameters: SGD trains backbone and projection head only.
        return torch.optim.SGD(self.parameters(), lr=0.06)


def make_transform(dataset):
    # CIFAR-10 images are 32x32: no resizing beyond the random crop, and no blur.
    options = augmentation_options(dataset)
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0, **options),
        view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0, **options),
    )


def main(argv=None):
    return fit(BYOL(), make_transform, __doc__, argv)


if __name__ == "__main__":
    main()
