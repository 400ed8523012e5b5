"""``--framework`` choices for ``compare``: the methods and backbones each framework builds, and the
predictors it can express."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from _directpred_bench import COMPARE_DEFAULT_PREDICTORS

from .backbones import backbone_names
from .methods import LightlyBYOL, LightlySimSiam, Method, MethodConfig
from .predictors import PREDICTOR_SPECS, predictor_names
from .solo_byol import SoloBYOL, require_solo


#: ``compare``'s predictors when ``--predictors`` is not given (the command line owns the list);
#: the rest of the family (directset, ns, ns2, stiefel, visser) is run by naming it.
DEFAULT_PREDICTORS = COMPARE_DEFAULT_PREDICTORS["lightly"]


def _solo_expressible(name: str) -> bool:
    return PREDICTOR_SPECS[name].solo_kwargs is not None


@dataclass(frozen=True)
class Framework:
    """One ``--framework`` choice: the methods it builds and what it can express."""

    #: ``--method`` name -> builder of a model.
    methods: Dict[str, Callable[[MethodConfig], Method]]
    #: Whether it can build the :data:`~.predictors.PREDICTOR_SPECS` name.
    expresses: Callable[[str], bool] = lambda name: True
    #: The ``--backbone`` names it builds (see ``backbones.BACKBONES``), the first being its
    #: default where the dataset's default is not among them.
    backbones: Tuple[str, ...] = backbone_names("compare")
    #: Whether it also builds any ``timm:<model>``.
    timm: bool = False
    #: Raises ImportError, naming how to install the framework, when it is missing.
    require: Callable[[], None] = lambda: None

    @property
    def predictors(self) -> Tuple[str, ...]:
        return tuple(name for name in predictor_names("compare") if self.expresses(name))

    @property
    def default_predictors(self) -> Tuple[str, ...]:
        """What ``compare`` runs without ``--predictors``: the comparison's baselines and DirectPred."""
        return tuple(name for name in DEFAULT_PREDICTORS if self.expresses(name))

    def default_backbone(self, dataset_default: str) -> str:
        return dataset_default if dataset_default in self.backbones else self.backbones[0]

    def builds_backbone(self, name: str) -> bool:
        return name in self.backbones or (self.timm and name.startswith("timm:"))


#: Framework name -> the methods it builds.
FRAMEWORKS: Dict[str, Framework] = {
    "lightly": Framework({"byol": LightlyBYOL.from_config, "simsiam": LightlySimSiam.from_config}, timm=True),
    # solo-learn's own BYOL, the predictor chosen through its YAML key (directpred_plugin/benchmarks/solo_byol.py).
    "solo": Framework({"byol": SoloBYOL}, expresses=_solo_expressible, backbones=backbone_names("solo"),
                      require=require_solo),
}
