"""The self-supervised methods the benchmarks train, with the predictor swapped per run:
:class:`Method` is the interface the training loop and ``step`` drive, and the lightly
models here implement it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Protocol, Tuple, TypeVar

import torch
from torch import Tensor, nn

from .predictors import build_predictor


M = TypeVar("M", bound="Method")


class Method(Protocol):
    """A self-supervised model as the benchmarks drive it (an ``nn.Module``)."""

    @property
    def predictor(self) -> nn.Module:
        """The prediction head the benchmark swaps."""

    def training_loss(self, x0: Tensor, x1: Tensor) -> Tuple[Tensor, Tensor]:
        """``(loss, online projections of x0)`` for one pair of views."""

    def update_target(self, momentum: float) -> None:
        """One EMA step of the target network (nothing without one)."""

    def encode(self, x: Tensor) -> Tensor:
        """Backbone features, flat: what the probes see."""

    def project(self, x: Tensor) -> Tensor:
        """Online projections: what the collapse and alignment measures see."""

    # the nn.Module methods the benchmarks call
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self: M, mode: bool = True) -> M: ...

    def to(self: M, device: torch.device) -> M: ...


@dataclass
class MethodConfig:
    """What a framework needs to build one model (it builds the backbone itself)."""

    backbone: str  # a --backbone name
    in_chans: int
    image_size: int
    num_classes: int
    proj_dim: int
    hidden_dim: int
    predictor: str  # a --predictors spec, name[:key=value,...]


class LightlyModel(nn.Module):
    """Backbone + projection head + prediction head and lightly's negative cosine, the parts every
    lightly method here shares. Built from its three parts, so that the benchmarks
    (``from_config``), the tests and the integration recipes share one definition whatever
    backbone they use."""

    def __init__(self, backbone: nn.Module, projection_head: nn.Module, prediction_head: nn.Module) -> None:
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity

        self.backbone = backbone
        self.projection_head = projection_head
        self.prediction_head = prediction_head
        self.criterion = NegativeCosineSimilarity()

    @property
    def predictor(self) -> nn.Module:
        return self.prediction_head

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(start_dim=1)

    def project(self, x: Tensor) -> Tensor:
        return self.projection_head(self.encode(x))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        z = self.project(x)
        return self.prediction_head(z), z


class LightlyBYOL(LightlyModel):
    """BYOL as lightly's ``examples/pytorch/byol.py`` builds it: an EMA target copy of backbone
    and projection head, ``NegativeCosineSimilarity`` between each view's prediction and the
    other view's target."""

    def __init__(self, backbone: nn.Module, projection_head: nn.Module, prediction_head: nn.Module) -> None:
        super().__init__(backbone, projection_head, prediction_head)
        from lightly.models.utils import deactivate_requires_grad

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    @classmethod
    def from_config(cls, cfg: MethodConfig) -> "LightlyBYOL":
        """lightly's ``BYOLProjectionHead``; the predictor from :func:`~.predictors.build_predictor`."""
        from lightly.models.modules.heads import BYOLProjectionHead

        from .backbones import build_backbone

        # built in this order, so that a seed gives every predictor the same backbone and projector
        backbone, feature_dim = build_backbone(cfg.backbone, cfg.in_chans, cfg.image_size)
        projection_head = BYOLProjectionHead(feature_dim, cfg.hidden_dim, cfg.proj_dim)
        return cls(backbone, projection_head, build_predictor(cfg.predictor, cfg.proj_dim, cfg.hidden_dim, "byol"))

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def training_loss(self, x0: Tensor, x1: Tensor) -> Tuple[Tensor, Tensor]:
        # in the order of lightly's example (the target's BatchNorm statistics follow it)
        p0, z0 = self(x0)
        target0 = self.forward_momentum(x0)
        p1, _ = self(x1)
        target1 = self.forward_momentum(x1)
        loss = 0.5 * (self.criterion(p0, target1) + self.criterion(p1, target0))
        return loss, z0

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)


class LightlySimSiam(LightlyModel):
    """SimSiam as lightly's ``examples/pytorch/simsiam.py`` builds it: no target network,
    stop-gradient on the projections, symmetric negative cosine."""

    @classmethod
    def from_config(cls, cfg: MethodConfig) -> "LightlySimSiam":
        """lightly's ``SimSiamProjectionHead``; the MLP predictor is ``SimSiamPredictionHead`` with
        the paper's 4x bottleneck (``proj_dim // 4``)."""
        from lightly.models.modules.heads import SimSiamProjectionHead

        from .backbones import build_backbone

        backbone, feature_dim = build_backbone(cfg.backbone, cfg.in_chans, cfg.image_size)
        projection_head = SimSiamProjectionHead(feature_dim, cfg.hidden_dim, cfg.proj_dim)
        prediction_head = build_predictor(cfg.predictor, cfg.proj_dim, max(cfg.proj_dim // 4, 1), "simsiam")
        return cls(backbone, projection_head, prediction_head)

    def training_loss(self, x0: Tensor, x1: Tensor) -> Tuple[Tensor, Tensor]:
        p0, z0 = self(x0)
        p1, z1 = self(x1)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        return loss, z0

    def update_target(self, momentum: float) -> None:
        """SimSiam has no target network."""
