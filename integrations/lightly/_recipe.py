"""What the lightly recipes share: data (CIFAR-10 through torchvision, or scikit-learn's
digits offline), the command line and the Lightning Trainer.

scikit-learn ships the 1,797 8x8 digits inside the package, so the recipes run without a
download. Each digit is upsampled to 32x32 RGB, the size of a CIFAR-10 image, so that the
same lightly transforms apply to both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from directpred_plugin.lightly import DirectPredDiagnostics

DATASETS = ("digits", "cifar10")
IMAGE_SIZE = 32


class Digits(Dataset):
    """scikit-learn's digits as 32x32 RGB PIL images with their labels."""

    def __init__(self, transform: Optional[Callable] = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16.
        pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        self.images = [
            Image.fromarray(p).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB") for p in pixels
        ]
        self.targets = digits.target.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def augmentation_options(dataset: str) -> Dict[str, Any]:
    """Changes to lightly's CIFAR-10 view transforms for ``dataset``.

    A mirrored digit is often another digit, and a crop of 8% of an 8x8 image keeps
    about two of its pixels, so digits get no flips and crops of at least 40%.
    """
    return {"hf_prob": 0.0, "min_scale": 0.4} if dataset == "digits" else {}


def load_dataset(name: str, data_dir: str, download: bool, make_transform: Callable[[str], Callable]) -> Dataset:
    """The training set ``name``, transformed by ``make_transform(name)``.

    CIFAR-10 falls back to digits (with a warning) when it is neither in ``data_dir`` nor
    downloadable.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "cifar10":
        created = _first_missing_folder(Path(data_dir))
        try:
            return torchvision.datasets.CIFAR10(data_dir, download=download, transform=make_transform(name))
        except (RuntimeError, OSError) as err:  # not on disk and download off, or offline
            if created is not None:  # a failed download would leave an empty folder behind
                shutil.rmtree(created, ignore_errors=True)
            warnings.warn(
                f"CIFAR-10 is not available in {data_dir!r} ({err}); training on scikit-learn's digits instead.",
                RuntimeWarning,
                stacklevel=2,
            )
    return Digits(transform=make_transform("digits"))


def _first_missing_folder(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (``None`` if ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-dir", default="data",
                        help="where CIFAR-10 is (or is downloaded to); the folder directpred-bench compare uses too")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                        help="download CIFAR-10 if it is not in --data-dir")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: run all epochs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--log-every", type=int, default=50,
                        help="log DirectPred diagnostics and the loss every N steps (at most once per epoch)")
    parser.add_argument("--output-dir", default=".", help="Lightning logs and checkpoints go here")
    return parser.parse_args(argv)


def fit(model: pl.LightningModule, make_transform: Callable[[str], Callable], description: str,
        argv: Optional[Sequence[str]] = None):
    """Trains ``model`` as lightly's Lightning examples do, with DirectPred diagnostics logged."""
    args = parse_args(description, argv)
    dataset = load_dataset(args.dataset, args.data_dir, args.download, make_transform)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
    )
    log_every = logging_interval(args.log_every, len(dataloader), args.max_steps)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        accelerator=args.accelerator,
        strategy=args.strategy,
        default_root_dir=args.output_dir,
        log_every_n_steps=log_every,
        callbacks=[DirectPredDiagnostics(every_n_steps=log_every)],
    )
    trainer.fit(model=model, train_dataloaders=dataloader)
    if trainer.is_global_zero and trainer.log_dir is not None:
        print(f"Loss and DirectPred diagnostics (every {log_every} steps) were logged to {trainer.log_dir}")
    return trainer, model


def logging_interval(requested: int, steps_per_epoch: int, max_steps: int) -> int:
    """``requested``, lowered so that a short run (one epoch, or ``max_steps``) still logs."""
    longest = steps_per_epoch if max_steps < 0 else min(steps_per_epoch, max_steps)
    return max(1, min(requested, longest))
