"""solo-learn adapter: switch a method's MLP predictor to DirectPred from the YAML config.

With the registration active, one line in a solo-learn pretraining config replaces the
predictor of BYOL, SimSiam and every other solo-learn method that has one::

    method_kwargs:
      predictor: directpred      # default: "mlp", solo-learn's own predictor, unchanged
      directpred:                # optional DirectPredHead options, see DIRECTPRED_OPTIONS
        rho: 0.3
        freq: 1

solo-learn's own command then uses DirectPred, in the main process and in the DDP workers
Lightning starts::

    python main_pretrain.py --config-path scripts/pretrain/cifar --config-name byol.yaml

The package installs a start-up hook (``_directpred_solo_autoregister``) that calls
:func:`register` right after ``solo.methods`` is imported; ``DIRECTPRED_SOLO_AUTOREGISTER=0``
turns it off. Without the hook, run the script through the launcher,
``python -m directpred_plugin.solo main_pretrain.py ...``, or call :func:`register` before
building models through ``solo.methods.METHODS``.

Two registries drive the adapter: :data:`PREDICTORS` (the values ``method_kwargs.predictor``
accepts) and :data:`METHOD_PREDICTORS` (which attributes of which solo-learn methods hold a
predictor, and how often a training step calls each). solo-learn is imported only when
:func:`register` runs, so this module imports without it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union, cast

import torch
from torch import nn

from ..head import DirectPredHead
from ..losses import IsoLoss
from ..predictors import closed_form_options
from ..rules import VARIANTS

__all__ = [
    "ISOLOSS_METHODS",
    "LOSSES",
    "PREDICTORS",
    "METHOD_PREDICTORS",
    "DIRECTPRED_OPTIONS",
    "PredictorFactory",
    "register",
    "directpred_options",
    "build_directpred",
    "log_to_stderr",
    "DEFAULT_CALLS_PER_UPDATE",
]

SOLO_INSTALL_HINT = (
    "directpred_plugin.solo needs solo-learn, installed from source (the PyPI release is a "
    "2021 build pinned to torch 1.9): git clone https://github.com/vturrisi/solo-learn && "
    'pip install "torchmetrics<0.12" "setuptools<81" einops && '
    "pip install --no-deps --no-build-isolation -e ./solo-learn "
    "(see integrations/solo_learn/README.md in the directpred-plugin repository)"
)


# --------------------------------------------------------------------------- predictors
class PredictorFactory(NamedTuple):
    """How one ``method_kwargs.predictor`` choice is configured and built.

    ``options`` validates the mapping found under ``method_kwargs.<choice>`` and returns it
    with defaults filled in (plain values, stored back into the cfg). ``build`` makes the
    module from the predictor's width, those options and the number of training-mode calls
    the method makes per training step.
    """

    options: Callable[[Mapping[str, Any]], Dict[str, Any]]
    build: Callable[[int, Mapping[str, Any], int], nn.Module]


_STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_BOOL_OPTIONS = ("trainable", "center", "sync_dist", "eps_inside")

#: ``method_kwargs.directpred.calls_per_update`` when the config leaves it out: one update
#: per training step (``"auto"``: the calls between two backward passes pool into one
#: update). ``null`` instead pools the calls per step that :data:`METHOD_PREDICTORS` counts.
DEFAULT_CALLS_PER_UPDATE: Union[int, str, None] = "auto"

#: Keys accepted under ``method_kwargs.directpred``: the :class:`DirectPredHead` options
#: (``stats_dtype`` as ``"float32"``/``"float64"``; ``calls_per_update: null`` means one
#: update per training step, see :func:`build_directpred`).
DIRECTPRED_OPTIONS: Tuple[str, ...] = (
    "rho",
    "eps",
    "freq",
    "variant",
    "trainable",
    "center",
    "calls_per_update",
    "stats_dtype",
    "sync_dist",
    "refresh",
    "alpha",
    "eps_inside",
    "ridge",
    "weight_momentum",
)


def directpred_options(options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Validate ``method_kwargs.directpred`` and fill in the defaults of :class:`DirectPredHead`.

    Raises ``ValueError`` naming the option and what was expected.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(DIRECTPRED_OPTIONS))
    if unknown:
        raise ValueError(
            f"method_kwargs.directpred: unknown option(s) {unknown}; valid options: {list(DIRECTPRED_OPTIONS)}"
        )
    defaults = inspect.signature(DirectPredHead.__init__).parameters
    resolved = {name: defaults[name].default for name in DIRECTPRED_OPTIONS}
    resolved.update(stats_dtype="float32", calls_per_update=DEFAULT_CALLS_PER_UPDATE)
    variant = options.get("variant", resolved["variant"])
    if variant in VARIANTS:  # the member's own defaults, as create_predictor(variant) has them
        resolved.update(closed_form_options(variant))
    resolved.update(options)

    for name in _BOOL_OPTIONS:
        if not isinstance(resolved[name], bool):
            raise ValueError(f"method_kwargs.directpred.{name} must be true or false, got {resolved[name]!r}")
    if resolved["stats_dtype"] not in _STATS_DTYPES:
        raise ValueError(
            f"method_kwargs.directpred.stats_dtype must be one of {sorted(_STATS_DTYPES)}, "
            f"got {resolved['stats_dtype']!r}"
        )
    try:  # the head's own checks, on a 1x1 head, so that the messages stay in one place
        _directpred_head(1, resolved, calls_per_step=1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"method_kwargs.directpred: {err}") from None
    return resolved


def _directpred_head(dim: int, options: Mapping[str, Any], calls_per_step: int) -> DirectPredHead:
    kwargs = dict(options)
    kwargs["stats_dtype"] = _STATS_DTYPES[kwargs["stats_dtype"]]
    if kwargs["calls_per_update"] is None:
        kwargs["calls_per_update"] = calls_per_step
    return DirectPredHead(dim, **kwargs)


def build_directpred(dim: int, options: Mapping[str, Any], calls_per_step: int) -> DirectPredHead:
    """A :class:`DirectPredHead` for a solo-learn predictor slot.

    Unless ``calls_per_update`` is set, the head pools the ``calls_per_step`` training-mode
    calls of one training step (one per view: BYOL also predicts its small crops) into one
    update: all views of a step are predicted with the same ``W_p``, the EMA takes one step
    from their pooled correlation and ``freq`` counts training steps, as in the paper.
    """
    return _directpred_head(dim, directpred_options(options), calls_per_step)


#: ``method_kwargs.predictor`` value -> factory; ``None`` keeps the method's own MLP.
PREDICTORS: Dict[str, Optional[PredictorFactory]] = {
    "mlp": None,
    "directpred": PredictorFactory(directpred_options, build_directpred),
}


# ------------------------------------------------------------------------------ methods
def _large_crops(model: Any) -> int:
    return model.num_large_crops  # forward() runs once per large crop


def _all_crops(model: Any) -> int:
    return model.num_crops  # BYOL's multicrop_forward() also predicts every small crop


def _twice_per_large_crop(model: Any) -> int:
    return 2 * model.num_large_crops  # All4One: in forward() and again in training_step()


#: solo-learn method -> {attribute holding a predictor: training-mode calls per step}.
#: Every predictor listed maps ``proj_output_dim`` to itself and is called on the projector
#: output ``z``. byol, simsiam, nnbyol and nnsiam train it against a stop-gradient target
#: with a cosine loss, the setting DirectPred is derived for; nnclr, mocov3 and all4one
#: train it through a contrastive loss, where the swap works but the paper says nothing.
#: Add an entry to make a custom method's predictor switchable.
METHOD_PREDICTORS: Dict[str, Dict[str, Callable[[Any], int]]] = {
    "byol": {"predictor": _all_crops},
    "simsiam": {"predictor": _large_crops},
    "nnbyol": {"predictor": _large_crops},
    "nnsiam": {"predictor": _large_crops},
    "nnclr": {"predictor": _large_crops},
    "mocov3": {"predictor": _large_crops},
    "all4one": {"predictor": _twice_per_large_crop, "predictor2": _large_crops},
}

#: solo-learn method -> (module, name of the loss function its ``training_step`` calls as
#: ``loss(p, z_target)``, the factor from IsoLoss's scale to that function's). With
#: ``method_kwargs.loss: isoloss`` that function is IsoLoss for the duration of a training
#: step: BYOL's ``2 - 2 cos`` becomes ``2 + 2 IsoLoss``, SimSiam's ``-cos`` IsoLoss itself.
ISOLOSS_METHODS: Dict[str, Tuple[str, str, float, float]] = {
    "byol": ("solo.methods.byol", "byol_loss_func", 2.0, 2.0),
    "nnbyol": ("solo.methods.nnbyol", "byol_loss_func", 2.0, 2.0),
    "simsiam": ("solo.methods.simsiam", "simsiam_loss_func", 0.0, 1.0),
    "nnsiam": ("solo.methods.nnsiam", "simsiam_loss_func", 0.0, 1.0),
}
#: Values of ``method_kwargs.loss``; options of IsoLoss go under ``method_kwargs.isoloss``.
LOSSES = ("default", "isoloss")

#: cfg keys appended to solo-learn's ``AutoResumer.SHOULD_MATCH``: a run never auto-resumes
#: a checkpoint trained with another predictor (its state_dict would not load).
RESUME_MUST_MATCH = ("method_kwargs.predictor", "method_kwargs.directpred")


# --------------------------------------------------------------------------- registration
def _import_solo() -> Tuple[Dict[str, Any], type, Any]:
    try:
        from solo.methods import METHODS
        from solo.methods.base import BaseMethod
        from solo.utils.auto_resumer import AutoResumer
    except ImportError as err:
        raise ImportError(f"{SOLO_INSTALL_HINT} ({err})") from err
    return METHODS, BaseMethod, AutoResumer


def register() -> None:
    """Make ``method_kwargs.predictor`` work on every model built through ``solo.methods.METHODS``.

    Each ``BaseMethod`` entry of ``METHODS`` is replaced by a subclass that checks the
    predictor choice when solo-learn checks its cfg, builds the chosen predictor after the
    method's ``__init__``, keeps the optimizer's parameter groups valid and refuses to
    resume a checkpoint trained with another predictor. Without ``method_kwargs.predictor``
    the model is the method's own, module for module. Idempotent.

    Raises ``ImportError`` with install instructions when solo-learn is missing.
    """
    methods, base_method, auto_resumer = _import_solo()
    for key, cls in list(methods.items()):
        if isinstance(cls, type) and issubclass(cls, base_method) and not issubclass(cls, _PredictorChoice):
            methods[key] = _method_class(key, cls)
    for key in RESUME_MUST_MATCH:
        if key not in auto_resumer.SHOULD_MATCH:
            auto_resumer.SHOULD_MATCH.append(key)


_CLASSES: Dict[str, type] = {}
_CLASS_PREFIX = "_method_"


def _method_class(key: str, base: Any) -> type:
    cls = _CLASSES.get(key)
    if cls is not None and cls.__bases__[-1] is base:
        return cls

    def add_and_assert_specific_cfg(cfg: Any) -> Any:
        return _check_predictor_cfg(key, base.add_and_assert_specific_cfg(cfg))

    cls = type(
        base.__name__,
        (_PredictorChoice, base),
        {
            "solo_method": key,
            "add_and_assert_specific_cfg": staticmethod(add_and_assert_specific_cfg),
            "__module__": __name__,
            # pickle (ddp_spawn) finds the class again through the module's __getattr__
            "__qualname__": _CLASS_PREFIX + key,
            "__doc__": base.__doc__,
        },
    )
    _CLASSES[key] = cls
    return cls


def __getattr__(name: str) -> type:
    if name.startswith(_CLASS_PREFIX):
        key = name[len(_CLASS_PREFIX) :]
        methods, _, _ = _import_solo()
        if key in methods:
            base = methods[key]
            return base if issubclass(base, _PredictorChoice) else _method_class(key, base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _choice(cfg: Any) -> Optional[str]:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, "method_kwargs.predictor", default=None)
    return None if value in (None, "None") else value


def _check_predictor_cfg(method: str, cfg: Any) -> Any:
    """Validate ``method_kwargs.predictor`` (and its options) for ``method``; fills option defaults.

    Runs inside solo-learn's ``add_and_assert_specific_cfg``, before any module is built.
    """
    from omegaconf import OmegaConf

    kwargs = cfg.method_kwargs
    choice = _choice(cfg)
    if method not in METHOD_PREDICTORS:
        option_blocks = [name for name, factory in PREDICTORS.items() if factory is not None]
        given = [f"method_kwargs.{k}" for k in ("predictor", *option_blocks, "isoloss") if k in kwargs]
        if kwargs.get("loss") == "isoloss":
            given.append("method_kwargs.loss: isoloss")
        if given:
            raise ValueError(
                f"method {method!r} has no predictor to replace, so {', '.join(given)} cannot be "
                f"set; methods with a predictor: {sorted(METHOD_PREDICTORS)} "
                "(directpred_plugin.solo.METHOD_PREDICTORS)"
            )
        return cfg
    if choice is not None and not (isinstance(choice, str) and choice in PREDICTORS):
        raise ValueError(
            f"method_kwargs.predictor must be one of {sorted(PREDICTORS)}, got {choice!r} "
            "(directpred_plugin.solo.PREDICTORS)"
        )
    for name, factory in PREDICTORS.items():
        if factory is not None and name != choice and name in kwargs:
            logging.getLogger(__name__).warning(
                "method_kwargs.%s is ignored: method_kwargs.predictor is %r", name, choice or "mlp"
            )
    _check_loss_cfg(method, choice, kwargs)
    factory = PREDICTORS.get(choice) if choice else None
    if factory is not None:
        raw = kwargs.get(choice)
        if raw is None:
            raw = {}
        elif OmegaConf.is_dict(raw):
            raw = OmegaConf.to_container(raw, resolve=True)
        else:
            raise ValueError(f"method_kwargs.{choice} must be a mapping of options, got {raw!r}")
        kwargs[choice] = factory.options(raw)
    return cfg


def _check_loss_cfg(method: str, choice: Optional[str], kwargs: Any) -> None:
    """Validate ``method_kwargs.loss`` / ``method_kwargs.isoloss`` and fill IsoLoss's defaults."""
    from omegaconf import OmegaConf

    loss = kwargs.get("loss", "default")
    if loss not in LOSSES:
        raise ValueError(f"method_kwargs.loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss != "isoloss":
        if "isoloss" in kwargs:
            raise ValueError("method_kwargs.isoloss is set, but method_kwargs.loss is not isoloss")
        return
    if method not in ISOLOSS_METHODS:
        raise ValueError(
            f"method_kwargs.loss: isoloss is available for {sorted(ISOLOSS_METHODS)} "
            f"(directpred_plugin.solo.ISOLOSS_METHODS), not {method!r}"
        )
    if choice != "directpred":
        raise ValueError("method_kwargs.loss: isoloss needs a closed-form predictor: set method_kwargs.predictor: directpred")
    raw = kwargs.get("isoloss") or {}
    raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_dict(raw) else raw
    if not isinstance(raw, dict) or set(raw) - {"form"}:
        raise ValueError(f"method_kwargs.isoloss takes only `form` (cosine or l2), got {raw!r}")
    form = raw.get("form", "cosine")
    if form not in ("cosine", "l2"):
        raise ValueError(f"method_kwargs.isoloss.form must be cosine or l2, got {form!r}")
    kwargs["isoloss"] = {"form": form}


# solo-learn's BaseMethod, which this class is mixed into; solo-learn has no type information.
_SoloMethod: Any = object


class _PredictorChoice(_SoloMethod):
    """Mixed into each registered solo-learn method (see :func:`register`)."""

    solo_method: str

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.replaced_predictors: List[str] = _install_predictors(self, self.solo_method, self.cfg)
        self.isoloss: Optional[IsoLoss] = None
        self._prediction_inputs: Dict[int, torch.Tensor] = {}
        self._recording_predictions = False
        kwargs = self.cfg.method_kwargs
        if kwargs.get("loss", "default") == "isoloss":
            self.isoloss = IsoLoss(self.predictor, form=kwargs.isoloss.form)
            self.predictor.register_forward_hook(self._record_prediction)

    def _record_prediction(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> None:
        if self._recording_predictions:  # IsoLoss needs the predictor's input next to its output
            self._prediction_inputs[id(output)] = args[0]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.isoloss is None:
            return super().training_step(batch, batch_idx)
        module_name, name, offset, factor = ISOLOSS_METHODS[self.solo_method]
        module = importlib.import_module(module_name)
        original = getattr(module, name)
        isoloss, inputs = self.isoloss, self._prediction_inputs

        def loss(p: torch.Tensor, z_target: torch.Tensor, simplified: bool = True) -> torch.Tensor:
            z = inputs.get(id(p))
            if z is None:
                raise RuntimeError(f"{module_name}.{name} got a prediction the DirectPred head did not make")
            return offset + factor * isoloss(z, p, z_target)

        setattr(module, name, loss)
        self._recording_predictions = True
        try:
            return super().training_step(batch, batch_idx)
        finally:
            setattr(module, name, original)
            self._recording_predictions = False
            inputs.clear()

    @property
    def learnable_params(self) -> List[Dict[str, Any]]:
        groups = super().learnable_params
        if not any(not list(getattr(self, attr).parameters()) for attr in self.replaced_predictors):
            return groups
        # A closed-form head has no parameters; drop the empty group it leaves so every
        # optimizer (and solo's static-lr bookkeeping) only sees groups with parameters.
        kept = []
        for group in groups:
            group = dict(group, params=list(group["params"]))
            if group["params"]:
                kept.append(group)
        return kept

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        _check_checkpoint_predictors(self, checkpoint.get("state_dict", {}))


def _install_predictors(model: nn.Module, method: str, cfg: Any) -> List[str]:
    from omegaconf import OmegaConf

    choice = _choice(cfg) if method in METHOD_PREDICTORS else None
    factory = PREDICTORS.get(choice) if choice else None
    if factory is None:
        return []
    options = cast(Dict[str, Any], OmegaConf.to_container(cfg.method_kwargs[choice], resolve=True))
    replaced = []
    for attr, calls_per_step in METHOD_PREDICTORS[method].items():
        dim = _square_width(getattr(model, attr), f"{method}.{attr}")
        head = factory.build(dim, options, calls_per_step(model))
        setattr(model, attr, head)
        replaced.append(attr)
        rank = os.environ.get("LOCAL_RANK")
        # Looked up here rather than at import: hydra's `job_logging: disabled` (solo-learn's
        # configs) disables every logger that already exists when it configures logging.
        logging.getLogger(__name__).info(
            "%s.%s = %s(%s), %d calls per training step (pid %d%s)",
            method, attr, type(head).__name__, head.extra_repr(), calls_per_step(model),
            os.getpid(), f", LOCAL_RANK {rank}" if rank else "",
        )
    return replaced


def _square_width(module: nn.Module, where: str) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[0].in_features != linears[-1].out_features:
        raise ValueError(
            f"{where}: DirectPred replaces a predictor that maps its input width to itself "
            f"(W_p is square), found {module!r}"
        )
    return linears[0].in_features


def _check_checkpoint_predictors(model: Any, state_dict: Mapping[str, Any]) -> None:
    for attr in METHOD_PREDICTORS.get(model.solo_method, {}):
        saved = [k for k in state_dict if k.startswith(attr + ".")]
        if not saved:
            continue
        saved_directpred = f"{attr}.corr" in state_dict
        built_directpred = isinstance(getattr(model, attr), DirectPredHead)
        if saved_directpred != built_directpred:
            describe = {True: "a DirectPred head (method_kwargs.predictor: directpred)",
                        False: "solo-learn's MLP (method_kwargs.predictor: mlp or unset)"}
            raise RuntimeError(
                f"cannot resume {model.solo_method}: the checkpoint's {attr} is {describe[saved_directpred]}, "
                f"but this run builds {describe[built_directpred]}. Resume with the predictor setting "
                "the checkpoint was trained with."
            )


def log_to_stderr() -> None:
    """Show this package's INFO lines (which predictor each model got) on stderr, once.

    solo-learn's configs disable hydra's logging setup, so without a handler of its own the
    line that confirms DirectPred is in use would not appear.
    """
    logger = logging.getLogger("directpred_plugin")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # solo-learn's code may give the root logger a handler too
