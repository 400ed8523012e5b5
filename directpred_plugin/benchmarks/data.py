"""Datasets for ``directpred-bench compare``: two augmented views for training, clean images for probes.

The table :data:`DATASETS` maps a name to a factory returning a :class:`Dataset`.
``digits`` (scikit-learn's bundled 8x8 handwritten digits) and ``fashion-mnist`` (28x28,
read from its IDX files: the Debian package ``dataset-fashion-mnist`` or a torchvision
download) work offline and are augmented batch-wise on the training device; ``cifar10``
and ``stl10`` come from torchvision and use lightly's ``BYOLTransform`` per sample in
DataLoader workers, as lightly's own examples do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Sized, Tuple, cast

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
    lr: float = 0.06  # SGD learning rate for batch 256, scaled linearly with the batch size
    ema_start: float = 0.99  # BYOL's target momentum at the first step (cosine to 1)


class Dataset(Protocol):
    """A dataset as ``compare`` trains on and probes it."""

    channels: int
    image_size: int
    num_classes: int
    defaults: DatasetDefaults

    def steps_per_epoch(self, batch_size: int) -> int:
        """Training steps in one epoch of :meth:`views` (incomplete batches dropped)."""

    def views(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Batch]:
        """One epoch of ``(x0, x1)``: two augmented views of each image, shuffled by ``generator``."""

    def labelled(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """``(x, y)`` batches of un-augmented images of ``split`` (``"train"`` or ``"test"``), in order."""


class DatasetFactory(Protocol):
    """How :data:`DATASETS` builds a dataset from ``compare``'s options."""

    def __call__(self, *, data_dir: Path, download: bool, workers: int, subset: Optional[int],
                 test_subset: Optional[int]) -> Dataset: ...


# ------------------------------------------------------------------ grey images
@dataclass(frozen=True)
class GreyAugment:
    """Random views of small grey images, sampled per image and applied to a whole batch at once.

    Small grey images get no colour jitter and little room to crop, so instead this uses a
    random affine warp (rotation, zoom, shift), an optional horizontal flip, random
    contrast/brightness, additive Gaussian noise and, with probability ``erase_prob``, one
    erased ``erase_px`` square. Inputs are raw intensities in [0, 1]; the output is
    standardised with the training-set mean and std. Batch-wise on the training device,
    because per-sample torchvision transforms in DataLoader workers would need the CPU
    cores the training itself uses.
    """

    mean: float
    std: float
    max_rotation_deg: float = 15.0
    scale: Tuple[float, float] = (0.85, 1.15)
    max_shift_px: float = 1.0
    flip_prob: float = 0.0
    contrast: Tuple[float, float] = (0.6, 1.4)
    brightness: float = 0.2
    noise_std: float = 0.1
    erase_prob: float = 0.5
    erase_px: int = 3

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        n, _, h, w = images.shape
        device = images.device

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            # Sampled on the CPU generator so that a seed gives the same views on any device.
            return (torch.rand(*shape, generator=generator) * (high - low) + low).to(device)

        max_rotation = math.radians(self.max_rotation_deg)
        angle = uniform(-max_rotation, max_rotation, n)
        zoom = uniform(*self.scale, n)
        shift = uniform(-1.0, 1.0, n, 2) * (2.0 * self.max_shift_px / w)  # pixels -> [-1, 1] coords
        flip = torch.where(torch.rand(n, generator=generator) < self.flip_prob, -1.0, 1.0).to(device)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                             torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        views = views * uniform(*self.contrast, n, 1, 1, 1) + uniform(-self.brightness, self.brightness, n, 1, 1, 1)
        views = views + self.noise_std * torch.randn(views.shape, generator=generator).to(device)

        size = self.erase_px
        erase = (torch.rand(n, generator=generator) < self.erase_prob).to(device)
        top = torch.randint(0, h - size + 1, (n,), generator=generator).to(device)
        left = torch.randint(0, w - size + 1, (n,), generator=generator).to(device)
        rows = torch.arange(h, device=device).view(1, h, 1)
        cols = torch.arange(w, device=device).view(1, 1, w)
        patch = (rows >= top.view(n, 1, 1)) & (rows < top.view(n, 1, 1) + size)
        patch = patch & (cols >= left.view(n, 1, 1)) & (cols < left.view(n, 1, 1) + size)
        views = views.masked_fill((patch & erase.view(n, 1, 1)).unsqueeze(1), 0.0)
        return (views - self.mean) / self.std


class InMemoryData:
    """Images held as one tensor per split, augmented batch-wise (see :class:`GreyAugment`).

    Subclasses set ``image_size`` and ``defaults`` (and ``num_classes`` if not 10) and hand
    their images to :meth:`set_images`.
    """

    channels = 1
    num_classes = 10
    image_size: int
    defaults: DatasetDefaults
    images: Dict[str, Tensor]
    labels: Dict[str, Tensor]

    def set_images(self, images: Dict[str, Tensor], labels: Dict[str, Tensor], **augment: object) -> None:
        """``images``/``labels``: ``{"train": ..., "test": ...}``, images ``(N, 1, H, W)`` in [0, 1];
        ``augment``: :class:`GreyAugment`'s options."""
        self.images, self.labels = images, labels
        self.mean, self.std = float(self.images["train"].mean()), float(self.images["train"].std())
        self.augment = GreyAugment(self.mean, self.std, **augment)  # type: ignore[arg-type]

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


class DigitsData(InMemoryData):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), a fixed stratified split.

    The split (``test_fraction`` of the images, ``random_state=0``) is the same for every
    run, so seeds vary only initialisation, batch order and augmentations. Digits are not
    mirror-symmetric: no flips; about a pixel of shift and a 3x3 erased patch.
    """

    image_size = 8
    defaults = DatasetDefaults(backbone="small-cnn", epochs=60, batch_size=128, proj_dim=64, hidden_dim=256)

    def __init__(self, test_fraction: float = 0.2, subset: Optional[int] = None, **_: object) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, test_idx = train_test_split(
            torch.arange(len(labels)).numpy(), test_size=test_fraction, stratify=labels.numpy(), random_state=0
        )
        train_idx = train_idx[:subset]
        self.set_images({"train": images[train_idx], "test": images[test_idx]},
                        {"train": labels[train_idx], "test": labels[test_idx]})


# ---------------------------------------------------------------- Fashion-MNIST
#: Where ``apt-get install dataset-fashion-mnist`` (Debian/Ubuntu) puts the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_INSTALL = (
    "Install it with `sudo apt-get update && sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts "
    f"the files in {DEBIAN_FASHION_MNIST}), or download it once with `python -c \"import torchvision; "
    "torchvision.datasets.FashionMNIST('data', download=True)\"` and pass `--data-dir data`."
)


def find_fashion_mnist(data_dir: Optional[Path]) -> Dict[Tuple[str, str], Path]:
    """The four IDX files (gzipped or not) from the first folder that has all of them: ``data_dir``
    itself, its torchvision layout (``FashionMNIST/raw``), then the Debian package's folder."""
    folders = [] if data_dir is None else [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw"]
    folders.append(DEBIAN_FASHION_MNIST)
    for folder in folders:
        files = {key: next((folder / name for name in (stem + ".gz", stem) if (folder / name).is_file()), None)
                 for key, stem in FASHION_MNIST_FILES.items()}
        if all(files.values()):
            return files  # type: ignore[return-value]
    searched = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(f"Fashion-MNIST's IDX files were not found (searched {searched}). {FASHION_MNIST_INSTALL}")


def read_idx(path: Path) -> Tensor:
    """An IDX file (the MNIST format: big-endian dims after a 4-byte magic) as a uint8 tensor."""
    import gzip

    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return torch.from_numpy(data.reshape(shape).copy())


class FashionMNISTData(InMemoryData):
    """Fashion-MNIST (28x28 grey, 10 classes), read from its IDX files without any network.

    ``subset`` takes the first N training images and ``test_subset`` the first N test images
    (prefixes are close to balanced: 186-216 per class in the first 2,000 training images). Views: up to
    15 degrees of rotation, 0.8-1.2 zoom, 3 px of shift, horizontal flips (garments are
    roughly mirror-symmetric), contrast/brightness, noise and an erased 8x8 square.
    """

    image_size = 28
    # The committed CPU benchmark's settings (docs/benchmarks/fashion-mnist-*; it adds --subset
    # 10000 --test-subset 2000). At the 0.06 of the other datasets 312 steps left the backbone
    # at its untrained accuracy; 0.3 was the best of the rates tried, and BYOL's target
    # momentum 0.9 the best of 0.9/0.96/0.99 over so few steps (README, "Sizing").
    defaults = DatasetDefaults(backbone="fashion-cnn", epochs=4, batch_size=128, proj_dim=128, hidden_dim=512,
                               lr=0.3, ema_start=0.9)

    def __init__(self, data_dir: Optional[Path] = None, subset: Optional[int] = None,
                 test_subset: Optional[int] = None, **_: object) -> None:
        files = find_fashion_mnist(data_dir)
        limits = {"train": subset, "test": test_subset}
        images = {split: read_idx(files[split, "images"])[:limit].unsqueeze(1).float() / 255.0
                  for split, limit in limits.items()}
        labels = {split: read_idx(files[split, "labels"])[:limit].long() for split, limit in limits.items()}
        self.set_images(images, labels, max_rotation_deg=15.0, scale=(0.8, 1.2), max_shift_px=3.0, flip_prob=0.5,
                        erase_px=8)


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
                 subset: Optional[int] = None, test_subset: Optional[int] = None, **_: object) -> None:
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
        blur: Dict[str, Any] = {} if spec.gaussian_blur is None else {"gaussian_blur": spec.gaussian_blur}
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

        def first(dataset: torch.utils.data.Dataset, limit: Optional[int]) -> torch.utils.data.Dataset:
            return dataset if limit is None else torch.utils.data.Subset(dataset, range(min(limit, len(cast(Sized, dataset)))))

        self.ssl = first(load(spec.ssl_split, True, ssl_transform), subset)
        self.splits = {
            "train": first(load("train" if spec.ssl_split else None, True, eval_transform), subset),
            "test": first(load("test", False, eval_transform), test_subset),
        }

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(cast(Sized, self.ssl)) // batch_size

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


CIFAR10 = TorchvisionSpec(
    dataset_class="CIFAR10", image_size=32, ssl_split=None, gaussian_blur=0.0,
    defaults=DatasetDefaults(backbone="resnet18", epochs=200, batch_size=256, proj_dim=256, hidden_dim=4096),
)
STL10 = TorchvisionSpec(
    dataset_class="STL10", image_size=96, ssl_split="train+unlabeled", gaussian_blur=None,
    defaults=DatasetDefaults(backbone="resnet18-imagenet-stem", epochs=100, batch_size=256, proj_dim=256,
                             hidden_dim=4096),
)

#: Dataset name -> factory; ``--dataset`` accepts every name here.
DATASETS: Dict[str, DatasetFactory] = {
    "digits": DigitsData,
    "fashion-mnist": FashionMNISTData,
    "cifar10": partial(TorchvisionData, CIFAR10),
    "stl10": partial(TorchvisionData, STL10),
}


def build_dataset(name: str, *, data_dir: Path = Path("data"), download: bool = False,
                  workers: Optional[int] = None, subset: Optional[int] = None,
                  test_subset: Optional[int] = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {sorted(DATASETS)}, got {name!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    return DATASETS[name](data_dir=Path(data_dir), download=download, workers=workers, subset=subset,
                          test_subset=test_subset)
