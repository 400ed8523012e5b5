"""The backbones every benchmark command names, in one table: modules mapping images to flat features.

Each :data:`BACKBONES` entry says which commands and frameworks offer it and what they need
(``step``'s input size, solo-learn's name for it); ``compare`` also builds any
``timm:<model>`` name, that timm model without its classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(in_chans: int) -> nn.Module:
    """Three 3x3 conv-BN-ReLU layers (16, 32, 64 channels, the second with stride 2) and global pooling.

    Sized for 8x8 digits on a laptop CPU: 64-d features, about 23k parameters.
    """
    return nn.Sequential(
        *_conv_bn_relu(in_chans, 16),
        *_conv_bn_relu(16, 32, stride=2),
        *_conv_bn_relu(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def fashion_cnn(in_chans: int) -> nn.Module:
    """Three 3x3 conv-BN-ReLU layers (16, 32, 64 channels), 2x2 max-pooling after the first two,
    global pooling: 64-d features, about 23k parameters.

    Sized for 28x28 grey images on one CPU core: 2x2 pooling after each of the first two
    layers keeps the forward pass near 2 MFLOP-multiply-adds per image; twice the channels
    made a training step 2.5x slower (measured, 1 thread).
    """
    return nn.Sequential(
        *_conv_bn_relu(in_chans, 16),
        nn.MaxPool2d(2),
        *_conv_bn_relu(16, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def resnet18(in_chans: int, cifar_stem: bool) -> nn.Module:
    """torchvision ResNet-18 without its classifier (512-d features), with the CIFAR stem (3x3 stride-1
    first conv, no max-pool) or its standard 7x7 stride-2 stem and max-pool (for 96x96 STL-10)."""
    import torchvision

    net = torchvision.models.resnet18()
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


def timm_backbone(model_name: str, in_chans: int) -> nn.Module:
    import timm

    return timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans)


class SoloBackbone(NamedTuple):
    """How ``compare --framework solo`` asks solo-learn's registry for a backbone (it takes no module)."""

    name: str  # solo-learn's ``backbone.name``
    cifar_stem: bool  # its small-image ResNet stem, which solo-learn picks by dataset name


@dataclass(frozen=True)
class Backbone:
    """One backbone name: how to build it, and which commands and frameworks offer it."""

    #: in_chans -> the module
    build: Callable[[int], nn.Module]
    #: ``compare --backbone`` (lightly's models) accepts the name
    compare: bool = True
    #: the image size ``step --backbones`` times it at; None: step does not offer it
    step_image_size: Optional[int] = None
    #: ``compare --framework solo`` builds solo-learn's own; None: solo-learn has no such backbone
    solo: Optional[SoloBackbone] = None


#: Backbone name -> how to build it and who offers it. ``step``'s names are those of its
#: committed tables: ``resnet18-cifar`` is compare's ``resnet18``, ``resnet50`` compare's
#: ``timm:resnet50``.
BACKBONES: Dict[str, Backbone] = {
    "small-cnn": Backbone(small_cnn, step_image_size=8),  # step: for smoke tests and dry runs
    "fashion-cnn": Backbone(fashion_cnn),
    "resnet18": Backbone(partial(resnet18, cifar_stem=True), solo=SoloBackbone("resnet18", cifar_stem=True)),
    "resnet18-imagenet-stem": Backbone(partial(resnet18, cifar_stem=False),
                                       solo=SoloBackbone("resnet18", cifar_stem=False)),
    "resnet18-cifar": Backbone(partial(resnet18, cifar_stem=True), compare=False, step_image_size=32),
    "resnet50": Backbone(partial(timm_backbone, "resnet50"), compare=False, step_image_size=224),
}


def backbone_names(offered_by: str) -> Tuple[str, ...]:
    """The names ``offered_by`` accepts, in table order: ``"compare"`` (lightly's models),
    ``"solo"`` (``compare --framework solo``) or ``"step"``."""
    offers: Dict[str, Callable[[Backbone], bool]] = {
        "compare": lambda entry: entry.compare,
        "solo": lambda entry: entry.solo is not None,
        "step": lambda entry: entry.step_image_size is not None,
    }
    return tuple(name for name, entry in BACKBONES.items() if offers[offered_by](entry))


@torch.no_grad()
def feature_dim(backbone: nn.Module, in_chans: int, image_size: int) -> int:
    was_training = backbone.training
    backbone.eval()
    dim = backbone(torch.zeros(2, in_chans, image_size, image_size)).flatten(1).shape[1]
    backbone.train(was_training)
    return int(dim)


def build_backbone(name: str, in_chans: int, image_size: int) -> Tuple[nn.Module, int]:
    """``(backbone, feature_dim)`` for a :data:`BACKBONES` name or ``timm:<model>``."""
    if name.startswith("timm:"):
        backbone = timm_backbone(name[len("timm:"):], in_chans)
    elif name in BACKBONES:
        backbone = BACKBONES[name].build(in_chans)
    else:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)} or 'timm:<model name>'")
    return backbone, feature_dim(backbone, in_chans, image_size)
