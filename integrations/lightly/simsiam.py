"""SimSiam with a DirectPred prediction head, in the shape of lightly's Lightning SimSiam example.

The model is lightly's SimSiam (ResNet-18 backbone, SimSiam projection head, stop-gradient
on the other view) with its 128-64-128 MLP predictor replaced by DirectPredPredictionHead:
see the diff in this folder's README. Runs offline on scikit-learn's digits by default, or
on CIFAR-10:

    python simsiam.py                                     # digits, CPU or GPU
    python simsiam.py --dataset cifar10 --data-dir datasets/cifar10 --download
    python simsiam.py --devices 2 --strategy ddp          # multi-GPU (or CPU) DDP

Requires: pip install "directpred-plugin[lightly]" scikit-learn
"""

import argparse
import os

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamProjectionHead
from lightly.transforms import SimSiamTransform

from directpred_plugin.lightly import DirectPredDiagnostics, DirectPredPredictionHead

from _data import DATASETS, augmentation_options, load_dataset


class SimSiam(pl.LightningModule):
    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = SimSiamProjectionHead(512, 512, 128)
        # Two views per step: one DirectPred update per step, as in the paper.
        self.prediction_head = DirectPredPredictionHead(128, calls_per_update=2)
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-dir", default="datasets/cifar10", help="where CIFAR-10 is (or is downloaded to)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                        help="download CIFAR-10 if it is not in --data-dir")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: run all epochs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--log-every", type=int, default=50, help="log DirectPred diagnostics every N steps")
    parser.add_argument("--output-dir", default=".", help="Lightning logs and checkpoints go here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model = SimSiam()
    dataset = load_dataset(args.dataset, args.data_dir, args.download, make_transform)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        accelerator=args.accelerator,
        strategy=args.strategy,
        default_root_dir=args.output_dir,
        log_every_n_steps=args.log_every,
        callbacks=[DirectPredDiagnostics(every_n_steps=args.log_every)],
    )
    trainer.fit(model=model, train_dataloaders=dataloader)
    return trainer, model


if __name__ == "__main__":
    main()
