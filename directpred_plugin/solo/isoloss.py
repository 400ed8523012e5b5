"""IsoLoss in a solo-learn method's training step, for one model only.

`IsoLossStep` runs the method's own ``training_step`` as a copy whose global loss
function (`ISOLOSS_METHODS`) is IsoLoss; solo-learn's module
is never changed, so every other model in the process, on any thread, keeps solo-learn's loss.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Dict, Tuple

from torch import Tensor, nn

from ..losses import IsoLoss
from .methods import IsoLossSlot

__all__ = ["IsoLossStep"]


class IsoLossStep:
    """The training step of one model with ``method_kwargs.loss: isoloss``.

    IsoLoss needs the predictor's input next to the prediction solo-learn hands its loss:
    `record` is a forward hook of the predictor that keeps them, during a step only.
    """

    def __init__(self, isoloss: IsoLoss, slot: IsoLossSlot) -> None:
        self.isoloss = isoloss
        self.slot = slot
        self._inputs: Dict[int, Tensor] = {}  # id(prediction) -> the predictor's input, during a step
        self._recording = False
        self._copies: Dict[Callable[..., Any], Callable[..., Any]] = {}

    def record(self, module: nn.Module, args: Tuple[Any, ...], output: Tensor) -> None:
        if self._recording:
            self._inputs[id(output)] = args[0]

    @property
    def pending(self) -> int:
        """Predictions recorded and not yet released (0 between steps)."""
        return len(self._inputs)

    def loss(self, p: Tensor, z_target: Tensor, simplified: bool = True) -> Tensor:
        """What the copied ``training_step`` calls in place of solo-learn's loss function."""
        z = self._inputs.get(id(p))
        if z is None:
            raise RuntimeError(f"{self.slot.function} got a prediction the DirectPred head did not make")
        return self.slot.offset + self.slot.factor * self.isoloss(z, p, z_target)

    def run(self, training_step: Callable[..., Any], model: Any, *args: Any, **kwargs: Any) -> Any:
        """``training_step(model, *args, **kwargs)`` with IsoLoss as its loss function."""
        step = self._copies.get(training_step)
        if step is None:
            step = self._copies[training_step] = self._with_isoloss(training_step)
        self._recording = True
        try:
            return step(model, *args, **kwargs)
        finally:
            self._recording = False
            self._inputs.clear()

    def _with_isoloss(self, function: Any) -> Callable[..., Any]:
        name = self.slot.function
        if name not in function.__code__.co_names or name not in function.__globals__:
            raise RuntimeError(
                f"{function.__module__}.{function.__qualname__} does not call {name}, so IsoLoss cannot take "
                "over its loss (has solo-learn changed?); see directpred_plugin.solo.ISOLOSS_METHODS"
            )
        # The function's own globals, with its loss function replaced in this copy only.
        namespace = {**function.__globals__, name: self.loss}
        copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                                  function.__closure__)
        copy.__kwdefaults__ = function.__kwdefaults__
        return copy

    def __getstate__(self) -> Dict[str, Any]:
        # The copies refer to solo-learn's functions by object: rebuilt after unpickling.
        return {**self.__dict__, "_copies": {}, "_inputs": {}, "_recording": False}
