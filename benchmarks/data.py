"""Datasets for ``directpred-bench compare``: two augmented views for training, clean images for probes.

Registry :data:`DATASETS` maps a name to a factory returning an object with

- ``channels``, ``image_size``, ``num_classes``, ``defaults`` (a :class:`DatasetDefaults`),
- ``steps_per_epoch(batch_size)``,
- ``views(batch_size, generator, device)``: one epoch of ``(x0, x1)`` view pairs,
- ``labelled(split, batch_size, device)``: ``(x, y)`` batches of un-augmented images,
  ``split`` being ``"train"`` or ``"test"``.

``digits`` (scikit-learn's bundled 8x8 handwritten digits) works offline and is augmented
batch-wise on the training device; ``cifar10`` and ``stl10`` come from torchvision and
use lightly's ``BYOLTransform`` per sample in DataLoader workers, as lightly's own
examples do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Batch = Tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DatasetDefaults:
    """Training defaults used when the command line leaves them out."""

    backbone: str
    epochs: int
    batch_size: int
    proj_dim: int
    hidden_dim: int


# --------------------------------------------------------------------------- digits
class DigitAugment:
    """Random views of 8x8 digits, sampled per image and applied to a whole batch at once.

    Digits are not mirror-symmetric and have one channel, so instead of crops, flips and
    colour jitter this uses a small random affine warp (rotation, zoom, shift by about a
    pixel), random contrast/brightness, additive Gaussian noise and, with probability
    ``erase_prob``, one erased 3x3 patch. Inputs are raw intensities in [0, 1]; the output
    is standardised with the training-set mean and std.
    """

    def __init__(
        self,
        mean: float,
        std: float,
        *,
        max_rotation_deg: float = 15.0,
        scale: Tuple[float, float] = (0.85, 1.15),
        max_shift_px: float = 1.0,
        contrast: Tuple[float, float] = (0.6, 1.4),
        brightness: float = 0.2,
        noise_std: float = 0.1,
        erase_prob: float = 0.5,
    ) -> None:
        self.mean, self.std = mean, std
        self.max_rotation = math.radians(max_rotation_deg)
        self.scale = scale
        self.max_shift_px = max_shift_px
        self.contrast = contrast
        self.brightness = brightness
        self.noise_std = noise_std
        self.erase_prob = erase_prob

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        n, _, h, w = images.shape
        device = images.device

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            # Sampled on the CPU generator so that a seed gives the same views on any device.
            return (torch.rand(*shape, generator=generator) * (high - low) + low).to(device)

        angle = uniform(-self.max_rotation, self.max_rotation, n)
        zoom = uniform(*self.scale, n)
        shift = uniform(-1.0, 1.0, n, 2) * (2.0 * self.max_shift_px / w)  # pixels -> [-1, 1] coords
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        views = views * uniform(*self.contrast, n, 1, 1, 1) + uniform(-self.brightness, self.brightness, n, 1, 1, 1)
        views = views + self.noise_std * torch.randn(views.shape, generator=generator).to(device)

        erase = (torch.rand(n, generator=generator) < self.erase_prob).to(device)
        top = torch.randint(0, h - 2, (n,), generator=generator).to(device)
        left = torch.randint(0, w - 2, (n,), generator=generator).to(device)
        rows = torch.arange(h, device=device).view(1, h, 1)
        cols = torch.arange(w, device=device).view(1, 1, w)
        patch = (rows >= top.view(n, 1, 1)) & (rows < top.view(n, 1, 1) + 3)
        patch = patch & (cols >= left.view(n, 1, 1)) & (cols < left.view(n, 1, 1) + 3)
        views = views.masked_fill((patch & erase.view(n, 1, 1)).unsqueeze(1), 0.0)
        return (views - self.mean) / self.std


class DigitsData:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), a fixed stratified split.

    The split (``test_fraction`` of the images, ``random_state=0``) is the same for every
    run, so seeds vary only initialisation, batch order and augmentations.
    """

    channels = 1
    num_classes = 10
    image_size = 8
    defaults = DatasetDefaults(backbone="small-cnn", epochs=60, batch_size=128, proj_dim=64, hidden_dim=256)

    def __init__(self, test_fraction: float = 0.2, **_: object) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, test_idx = train_test_split(
            torch.arange(len(labels)).numpy(), test_size=test_fraction, stratify=labels.numpy(), random_state=0
        )
        self.images = {"train": images[train_idx], "test": images[test_idx]}
        self.labels = {"train": labels[train_idx], "test": labels[test_idx]}
        mean, std = float(self.images["train"].mean()), float(self.images["train"].std())
        self.mean, self.std = mean, std
        self.augment = DigitAugment(mean, std)

    def __len__(self) -> int:
        return len(self.labels["train"])

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size

    def views(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Batch]:
        images = self.images["train"].to(device)
        order = torch.randperm(len(self), generator=generator)
        for step in range(self.steps_per_epoch(batch_size)):
            batch = images[order[step * batch_size : (step + 1) * batch_size].to(device)]
            yield self.augment(batch, generator), self.augment(batch, generator)

    def labelled(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        images, labels = self.images[split], self.labels[split]
        for start in range(0, len(labels), batch_size):
            x = (images[start : start + batch_size] - self.mean) / self.std
            yield x.to(device), labels[start : start + batch_size]


# ---------------------------------------------------------------------- torchvision
@dataclass(frozen=True)
class TorchvisionSpec:
    dataset_class: str
    image_size: int
    ssl_split: Optional[str]  # STL-10: the unlabelled images too; None: CIFAR's train=True
    defaults: DatasetDefaults
    gaussian_blur: Optional[float]  # None: lightly's BYOL defaults; CIFAR: 0 as in lightly's examples


class TorchvisionData:
    """CIFAR-10 / STL-10 from torchvision with lightly's BYOL augmentations.

    Probes use the labelled train split and the test split, resized to ``image_size`` and
    normalised like the training views. Nothing is downloaded unless ``download=True``.
    """

    channels = 3
    num_classes = 10

    def __init__(self, spec: TorchvisionSpec, data_dir: Path, download: bool = False, workers: int = 4,
                 **_: object) -> None:
        import torchvision
        import torchvision.transforms as T
        from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
        from lightly.transforms.utils import IMAGENET_NORMALIZE

        self.spec = spec
        self.defaults = spec.defaults
        self.image_size = spec.image_size
        self.workers = workers
        cls = getattr(torchvision.datasets, spec.dataset_class)
        size = spec.image_size
        blur = {} if spec.gaussian_blur is None else {"gaussian_blur": spec.gaussian_blur}
        ssl_transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=size, **blur),
            view_2_transform=BYOLView2Transform(input_size=size, **blur),
        )
        eval_transform = T.Compose([
            T.Resize(size),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
        ])

        def load(split: Optional[str], train: bool, transform: Callable) -> torch.utils.data.Dataset:
            kwargs = {"split": split} if spec.dataset_class == "STL10" else {"train": train}
            try:
                return cls(str(data_dir), download=download, transform=transform, **kwargs)
            except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
                raise FileNotFoundError(
                    f"{spec.dataset_class} was not found under --data-dir {data_dir} ({error}). "
                    "Pass --download to fetch it, or point --data-dir at an existing copy."
                ) from error

        self.ssl = load(spec.ssl_split, True, ssl_transform)
        self.splits = {
            "train": load("train" if spec.ssl_split else None, True, eval_transform),
            "test": load("test", False, eval_transform),
        }

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.ssl) // batch_size

    def _loader(self, dataset, batch_size: int, shuffle: bool, generator: Optional[torch.Generator], device):
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=generator,
            num_workers=self.workers, pin_memory=torch.device(device).type == "cuda",
            persistent_workers=False,
        )

    def views(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Batch]:
        for (x0, x1), _ in self._loader(self.ssl, batch_size, True, generator, device):
            yield x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)

    def labelled(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        for x, y in self._loader(self.splits[split], batch_size, False, None, device):
            yield x.to(device, non_blocking=True), y


def _torchvision(spec: TorchvisionSpec) -> Callable[..., TorchvisionData]:
    def build(**options: object) -> TorchvisionData:
        return TorchvisionData(spec, **options)  # type: ignore[arg-type]

    return build


CIFAR10 = TorchvisionSpec(
    dataset_class="CIFAR10", image_size=32, ssl_split=None, gaussian_blur=0.0,
    defaults=DatasetDefaults(backbone="resnet18", epochs=200, batch_size=256, proj_dim=256, hidden_dim=4096),
)
STL10 = TorchvisionSpec(
    dataset_class="STL10", image_size=96, ssl_split="train+unlabeled", gaussian_blur=None,
    defaults=DatasetDefaults(backbone="resnet18-imagenet-stem", epochs=100, batch_size=256, proj_dim=256,
                             hidden_dim=4096),
)

#: Dataset name -> factory(data_dir=..., download=..., workers=...).
DATASETS: Dict[str, Callable[..., object]] = {
    "digits": DigitsData,
    "cifar10": _torchvision(CIFAR10),
    "stl10": _torchvision(STL10),
}


def build_dataset(name: str, *, data_dir: Path = Path("data"), download: bool = False,
                  workers: Optional[int] = None):
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {sorted(DATASETS)}, got {name!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    return DATASETS[name](data_dir=Path(data_dir), download=download, workers=workers)
