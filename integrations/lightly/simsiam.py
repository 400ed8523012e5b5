"""SimSiam with a DirectPred prediction head, in the shape of lightly's Lightning SimSiam example.

The model is lightly's SimSiam (ResNet-18 backbone, SimSiam projection head, stop-gradient
on the other view) with its 128-64-128 MLP predictor replaced by DirectPredPredictionHead:
see the diff in this folder's README. Runs offline on scikit-learn's digits by default, or
on CIFAR-10:

    python simsiam.py                                     # digits, CPU or GPU
    python simsiam.py --dataset cifar10 --download        # into ./data (--data-dir)
    python simsiam.py --devices 2 --strategy ddp          # multi-GPU (or CPU) DDP

Requires directpred-plugin with its lightly extra, and scikit-learn; from this folder of a
checkout: pip install -e "../..[lightly]" scikit-learn
"""


import pytorch_lightning as pl
import torch
import torchvision
from torch import nn

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamProjectionHead
from lightly.transforms import SimSiamTransform

from directpred_plugin.lightly import DirectPredPredictionHead

from _recipe import augmentation_options, fit


class SimSiam(pl.LightningModule):
    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = SimSiamProjectionHead(512, 512, 128)
        # lightly's example: SimSiamPredictionHead(128, 64, 128). The hidden width is unused.
        self.prediction_head = DirectPredPredictionHead(128, 64, 128)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        features = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(features)
        p = self.prediction_head(z)
        # The projection is the (stop-gradient) target for the other view.
        return z.detach(), p

    def training_step(self, batch, batch_idx):
        (x0, x1) = batch[0]
        z0, p0 = self.forward(x0)
        z1, p1 = self.forward(x1)
        loss = 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The DirectPred head has no parameters: SGD trains backbone and projection head only.
        return torch.optim.SGD(self.parameters(), lr=0.06)


def make_transform(dataset):
    return SimSiamTransform(input_size=32, **augmentation_options(dataset))


def main(argv=None):
    return fit(SimSiam(), make_transform, __doc__, argv)


if __name__ == "__main__":
    main()
