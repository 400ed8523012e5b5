"""How a head's calls meet autograd: the ``W_p`` each call uses, and its recomputation.

:class:`WeightSnapshots` hands each training-mode call an immutable copy of ``W_p`` (a later
in-place refresh never alters what autograd saved) and knows which copy the calls of the
current step used, so that activation checkpointing's recomputation gets the same one, or
an error where that is impossible. :func:`linear` is the head's output without autocast.
"""

from __future__ import annotations

import contextlib
import sys
from types import FrameType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import CheckpointFunction

__all__ = ["WeightSnapshots", "linear", "autocast_disabled", "inside_backward", "in_reentrant_checkpoint"]

_REENTRANT_FORWARD = CheckpointFunction.forward.__code__
CHECKPOINT_ERROR = (
    "DirectPredHead cannot be recomputed exactly under activation checkpointing here: {}. Use "
    "torch.utils.checkpoint with use_reentrant=False and calls_per_update='auto' (W_p changes only "
    "between steps), or keep the head outside the checkpointed function."
)


class WeightSnapshots:
    """The copies of ``W_p`` handed to calls, and which one the calls of this step used."""

    def __init__(self) -> None:
        self.generation = 0  # bumped whenever W_p may change
        self._copy: Optional[tuple] = None  # (generation, immutable copy of W_p)
        self._casts: dict = {}  # that copy in the inputs' other dtypes
        self.new_step()

    def new_step(self) -> None:
        self.step_generation: Optional[int] = None
        self.step_version: Optional[int] = None  # W_p's in-place version at the step's first call
        self.mixed = False  # the calls of this step used different W_p
        self.untracked = 0  # training-mode calls of this step without autograd

    def changed(self) -> None:
        self.generation += 1

    def drop(self) -> None:
        """Forget the copies (after a load, a move or a pickle); the step record stays."""
        self._copy = None
        self._casts = {}

    def for_call(self, weight: Tensor, trainable: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The ``W_p`` for a training-mode call, in ``dtype`` (the input's): a buffer ``W_p`` is
        copied and cast once per refresh, not per call."""
        if self.step_generation is None:
            self.step_generation, self.step_version = self.generation, weight._version
            if trainable:  # the optimizer may have moved W_p since the last step
                self._copy = None
        elif self.step_generation != self.generation or (trainable and self.step_version != weight._version):
            # A refresh moved W_p, or (trainable) an optimizer step inside the step, or a copy of the
            # head whose W_p is another tensor: no recomputation can be sure of this step's W_p.
            # A buffer W_p is written only by refreshes (DDP's buffer broadcast rewrites equal values).
            self.mixed = True
        if self._copy is None or self._copy[0] != self.generation:
            self._copy = (self.generation, weight.detach().clone())
            self._casts = {}
        # A trainable W_p is returned as a differentiable copy: a later in-place refresh leaves it.
        if trainable:
            return weight.clone()
        return self._cast(dtype)

    def _cast(self, dtype: Optional[torch.dtype]) -> Tensor:
        assert self._copy is not None
        copy = self._copy[1]
        if dtype is None or dtype == copy.dtype:
            return copy
        if dtype not in self._casts:
            self._casts[dtype] = copy.to(dtype)
        return self._casts[dtype]

    def for_recomputation(self, weight: Tensor, trainable: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
        if self.step_generation is None or self.mixed or self.untracked or self._copy is None:
            raise RuntimeError(CHECKPOINT_ERROR.format(
                "W_p changed between the calls of this step (calls_per_update updates inside the step, "
                "or an optimizer step before the step's backward)"
                if self.mixed else "not every call of this step was a training-mode call with autograd on"))
        if trainable:  # the values of the forward pass, the gradient to the parameter
            return weight + (self._copy[1] - weight).detach()
        return self._cast(dtype)

    def __getstate__(self):  # pickling and deepcopy drop the copies of W_p
        return {**self.__dict__, "_copy": None, "_casts": {}}


def linear(z: Tensor, weight: Tensor) -> Tensor:
    with autocast_disabled(z.device.type):
        return F.linear(z, weight.to(z.dtype))


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know, so nothing to disable
        return contextlib.nullcontext()


def inside_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


def in_reentrant_checkpoint() -> bool:
    """True inside the forward of ``torch.utils.checkpoint(..., use_reentrant=True)``."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _REENTRANT_FORWARD:
            return True
        frame = frame.f_back
    return False
