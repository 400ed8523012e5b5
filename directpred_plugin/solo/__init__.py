"""solo-learn adapter: switch a method's MLP predictor to DirectPred from the YAML config.

With the registration active, one line in a solo-learn pretraining config replaces the
predictor of BYOL, SimSiam and every other solo-learn method that has one:

```yaml
method_kwargs:
  predictor: directpred      # default: "mlp", solo-learn's own predictor, unchanged
  directpred:                # optional DirectPredHead options, see DIRECTPRED_OPTIONS
    rho: 0.3
    freq: 1
    log_every_n_steps: 50    # the heads' diagnostics through the model's self.log (0: never)
```

``predictor`` takes ``mlp`` or any name of `directpred_plugin.VARIANTS`
(``directpred``, ``directcopy``, ``ns``, ``directpred-hybrid``, ...), each with that name's
defaults (`predictor_choices`); ``method_kwargs.directpred`` holds the options the
config changes, for every closed-form choice. A name builds the same head here as
``DirectPredHead(dim, variant=name)`` and the benchmarks do.

solo-learn's own command then uses DirectPred, in the main process and in the DDP workers
Lightning starts:

```bash
python main_pretrain.py --config-path scripts/pretrain/cifar --config-name byol.yaml
```

The package installs a start-up hook (``_directpred_solo_autoregister``) that calls
`register` right after ``solo.methods`` is imported. ``DIRECTPRED_SOLO_AUTOREGISTER=0``
turns it off; a config that asks for a DirectPred predictor is then refused rather than
trained with the MLP, until the script runs through the launcher,
``python -m directpred_plugin.solo main_pretrain.py ...``, or calls `register`.

`register` patches solo-learn's method classes in place, so every way of building a
model honours the key: ``METHODS["byol"](cfg)``, ``solo.methods.BYOL(cfg)`` and subclasses
of them. `METHOD_PREDICTORS` says which attributes of which solo-learn methods hold a
predictor, and how often a training step calls each. solo-learn is imported only when
`register` runs, so this module imports without it.

The adapter, one job per module: ``choices`` (the predictor names), ``methods`` (what it
knows of each solo-learn method), ``lookalikes`` and ``config`` (checking ``method_kwargs``
once, before any module is built), ``install`` (building the heads into the model),
``isoloss`` (IsoLoss in one model's training step), ``diagnostics`` (logging the heads'
health through the model's ``self.log``), ``resume`` (checkpoint checks) and
``registration`` (patching the classes); ``launcher`` runs a script with it registered.
"""

from __future__ import annotations

from .choices import MLP, predictor_choices, resolved_options
from .config import DIRECTPRED_OPTIONS, LOSSES, directpred_options
from .install import build_directpred, log_to_stderr
from .methods import ISOLOSS_METHODS, METHOD_PREDICTORS
from .registration import SOLO_INSTALL_HINT, register, unregister
from .resume import RESUME_MUST_MATCH

__all__ = [
    "ISOLOSS_METHODS",
    "LOSSES",
    "METHOD_PREDICTORS",
    "DIRECTPRED_OPTIONS",
    "RESUME_MUST_MATCH",
    "MLP",
    "SOLO_INSTALL_HINT",
    "predictor_choices",
    "register",
    "unregister",
    "directpred_options",
    "build_directpred",
    "resolved_options",
    "log_to_stderr",
]
