"""solo-learn's BYOL for ``directpred-bench compare --framework solo``.

The model is solo-learn's own ``BYOL`` (``solo.methods.METHODS["byol"]`` after
:func:`directpred_plugin.solo.register`) with a cfg built as solo-learn's method tests build
one. The predictor is picked as a solo-learn user picks it, by ``method_kwargs.predictor``
(:attr:`~.predictors.PredictorSpec.solo_kwargs`): ``mlp`` is solo-learn's MLP, a family name
the plugin's head with the spec's options under ``method_kwargs.directpred``; its config has
no linear or identity predictor, so ``linear`` and ``none`` are refused. Backbones come from
solo-learn's registry (the ``solo`` of a ``backbones.BACKBONES`` entry: ``resnet18`` with its
small-image stem, ``resnet18-imagenet-stem`` without); grey images are repeated to 3 channels.

The compare loop drives the module's pieces rather than a Lightning ``Trainer``, so that both
frameworks train under one loop (SGD, schedules, data, timing). A step is ``BYOL.training_step``
for two large crops without what needs labels or a Trainer (the online classifier, which sees
detached features only, and logging): ``forward`` on both views, ``momentum_forward`` for the
targets, ``byol_loss_func`` summed over the two view pairs, and the EMA by solo-learn's
``MomentumUpdater``. That loss is ``2 - 2 cos`` per pair, summed: 4x the gradient of lightly's
averaged negative cosine, so the same ``--lr`` takes 4x larger SGD steps here.
"""

from __future__ import annotations

import warnings
from typing import Any, Tuple

import torch
from torch import Tensor, nn

from .backbones import BACKBONES, backbone_names
from .methods import MethodConfig
from .predictors import PREDICTOR_SPECS, solo_method_kwargs


def require_solo() -> None:
    """Import solo-learn and register the plugin; ImportError saying how to install solo-learn."""
    from directpred_plugin.solo import register

    with warnings.catch_warnings():
        # Import-time noise: timm/torch deprecations and solo-learn re-registering timm models.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            register()
        except ImportError as err:
            raise ImportError(f"--framework solo: {err}") from err


def solo_config(cfg: MethodConfig) -> Any:
    """The solo-learn cfg (an OmegaConf DictConfig) of one BYOL model."""
    from omegaconf import OmegaConf

    solo_kwargs = solo_method_kwargs(cfg.predictor)
    if solo_kwargs is None:
        supported = [name for name, spec in PREDICTOR_SPECS.items() if spec.solo_kwargs is not None]
        raise ValueError(f"solo-learn cannot build predictor {cfg.predictor!r}; it supports {supported}")
    solo_backbone = BACKBONES[cfg.backbone].solo if cfg.backbone in BACKBONES else None
    if solo_backbone is None:
        raise ValueError(f"solo-learn builds --backbone {' or '.join(backbone_names('solo'))}, got {cfg.backbone!r}")
    name, cifar_stem = solo_backbone
    method_kwargs = {
        "proj_hidden_dim": cfg.hidden_dim,
        "proj_output_dim": cfg.proj_dim,
        "pred_hidden_dim": cfg.hidden_dim,
        **solo_kwargs,
    }
    config = OmegaConf.create({
        "name": "directpred-bench-compare",
        "method": "byol",
        "backbone": {"name": name},
        "method_kwargs": method_kwargs,
        # base_tau only starts solo-learn's own schedule; the compare loop sets the EMA rate.
        "momentum": {"base_tau": 0.99, "final_tau": 1.0},
        # solo-learn picks its small-image ResNet stem from the dataset name.
        "data": {"dataset": "cifar10" if cifar_stem else "custom", "train_path": ".", "val_path": ".",
                 "format": "image_folder", "num_workers": 0, "num_large_crops": 2, "num_small_crops": 0,
                 "num_classes": cfg.num_classes},
        # Read by BaseMethod.__init__, used only by configure_optimizers: the compare loop
        # brings its own optimizer and schedules.
        "optimizer": {"name": "sgd", "batch_size": 1, "lr": 0.0, "classifier_lr": 0.0, "weight_decay": 0.0,
                      "kwargs": {"momentum": 0.9}},
        "scheduler": {"name": "none", "interval": "epoch"},
        "checkpoint": {"enabled": False},
        "auto_resume": {"enabled": False},
        "max_epochs": 1,
        "devices": 1,
        "accelerator": "cpu",
        "num_nodes": 1,
        # main_pretrain would convert the model to channels_last; the loop keeps it as built.
        "performance": {"disable_channel_last": True},
    })
    OmegaConf.set_struct(config, False)
    return config


class SoloBYOL(nn.Module):
    """solo-learn's BYOL with the interface the compare loop drives (``methods.Method``).

    ``self.solo`` is the ``solo.methods.METHODS["byol"]`` module; its predictor is solo-learn's
    MLP or, for the DirectPred predictors, the plugin's :class:`~directpred_plugin.DirectPredHead`.
    """

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        if cfg.in_chans not in (1, 3):
            raise ValueError(f"solo-learn's backbones take 3-channel images (or 1, repeated), got {cfg.in_chans}")
        config = solo_config(cfg)
        require_solo()
        from solo.methods import METHODS

        self.solo = METHODS["byol"](config)

    @property
    def predictor(self) -> nn.Module:
        return self.solo.predictor

    @staticmethod
    def _rgb(x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def encode(self, x: Tensor) -> Tensor:
        return self.solo.backbone(self._rgb(x))

    def project(self, x: Tensor) -> Tensor:
        return self.solo.projector(self.encode(x))

    def training_loss(self, x0: Tensor, x1: Tensor) -> Tuple[Tensor, Tensor]:
        from solo.losses.byol import byol_loss_func

        views = [self._rgb(x0), self._rgb(x1)]
        online = [self.solo(x) for x in views]
        targets = [self.solo.momentum_forward(x)["z"] for x in views]
        # As BYOL.training_step pairs them: each view's prediction against the other view's target.
        loss = sum(byol_loss_func(online[v2]["p"], targets[v1]) for v1 in range(2) for v2 in range(2) if v2 != v1)
        return loss, online[0]["z"]

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        updater = self.solo.momentum_updater
        updater.cur_tau = momentum
        for online, target in self.solo.momentum_pairs:
            updater.update(online, target)
