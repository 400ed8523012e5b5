"""``compare``'s configuration: every option, its defaults and its validation."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from .frameworks import FRAMEWORKS
from .predictors import check_predictor, parse_predictor_spec


@dataclass
class CompareConfig:
    dataset: str = "digits"
    method: str = "byol"
    predictors: Optional[List[str]] = None  # None: the framework's default_predictors
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    framework: str = "lightly"
    backbone: Optional[str] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    proj_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    subset: Optional[int] = None  # training images (None: all)
    test_subset: Optional[int] = None  # test images (None: all)
    lr: Optional[float] = None  # for batch 256, scaled linearly with the batch size (None: the dataset's)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    ema_start: Optional[float] = None  # None: the dataset's
    knn_k: int = 20
    probe_epochs: Optional[List[int]] = None  # also probe after these epochs (None: after the last only)
    probe_linear: bool = False  # the linear probe at probe_epochs too (the last epoch always has it)
    device: str = "cpu"
    data_dir: str = "data"
    download: bool = False
    workers: Optional[int] = None
    threads: int = 1
    jobs: int = 1
    progress: bool = True

    def resolve(self, defaults: Any) -> "CompareConfig":
        """Fill the options left as None from the dataset's defaults."""
        cfg = copy.copy(self)
        for name in ("epochs", "batch_size", "proj_dim", "hidden_dim", "lr", "ema_start"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(defaults, name))
        framework = FRAMEWORKS[cfg.framework]
        if cfg.predictors is None:
            cfg.predictors = list(framework.default_predictors)
        if cfg.backbone is None:
            cfg.backbone = framework.default_backbone(defaults.backbone)
        return cfg

    def validate(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"--framework must be one of {sorted(FRAMEWORKS)}, got {self.framework!r}")
        framework = FRAMEWORKS[self.framework]
        if self.method not in framework.methods:
            raise ValueError(f"--framework {self.framework} builds --method {' or '.join(framework.methods)}, "
                             f"got {self.method!r}")
        for spec in self.predictors or ():
            check_predictor(spec, "compare")
        if len(set(self.predictors or ())) != len(self.predictors or ()):
            raise ValueError(f"--predictors names a predictor twice: {self.predictors}")
        inexpressible = [p for p in self.predictors or () if not framework.expresses(parse_predictor_spec(p)[0])]
        if inexpressible:
            raise ValueError(
                f"--framework {self.framework} cannot build predictor(s) {inexpressible}; "
                f"it supports {list(framework.predictors)}"
            )
        if self.backbone is not None and not framework.builds_backbone(self.backbone):
            if framework.timm:
                raise ValueError(f"--backbone must be one of {sorted(framework.backbones)} or 'timm:<model name>', "
                                 f"got {self.backbone!r}")
            raise ValueError(
                f"--framework {self.framework} builds --backbone {' or '.join(framework.backbones)}, "
                f"got {self.backbone!r}"
            )
        if not self.seeds:
            raise ValueError("--seeds needs at least one integer seed")
        for name in ("epochs", "batch_size", "proj_dim", "hidden_dim", "knn_k", "subset", "test_subset", "jobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for epoch in self.probe_epochs or ():
            if not isinstance(epoch, int) or epoch < 1 or (self.epochs is not None and epoch > self.epochs):
                raise ValueError(f"--probe-epochs must lie in 1..--epochs ({self.epochs}), got {epoch!r}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
        framework.require()
