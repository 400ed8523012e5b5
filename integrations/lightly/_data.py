"""Data for the lightly recipes: CIFAR-10 through torchvision, or scikit-learn's digits offline.

scikit-learn ships the 1,797 8x8 digits inside the package, so the recipes run without a
download. Each digit is upsampled to 32x32 RGB, the size of a CIFAR-10 image, so that the
same lightly transforms apply to both.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional

import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import Dataset

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
        try:
            return torchvision.datasets.CIFAR10(data_dir, download=download, transform=make_transform(name))
        except (RuntimeError, OSError) as err:  # not on disk and download off, or offline
            warnings.warn(
                f"CIFAR-10 is not available in {data_dir!r} ({err}); training on scikit-learn's digits instead.",
                RuntimeWarning,
                stacklevel=2,
            )
    return Digits(transform=make_transform("digits"))
