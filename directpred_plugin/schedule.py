"""The host side of a head: when a step ends, when to refresh, and what the host knows of the device.

:class:`StepSchedule` is a pure-Python state machine over the calls a head receives: it
counts the calls in the open pool and the closed pools (steps), sees step boundaries and
says when a pool closes and when a refresh is due. :class:`CounterMirror` carries two device
counters to the host one step late without ever waiting for the device. Both are saved
with the head (``get_extra_state``), so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["StepSchedule", "CounterMirror"]


@dataclass
class StepSchedule:
    """Calls, steps and step boundaries of one head; decides when pools close and refreshes run.

    ``calls_per_update=None`` (``"auto"``): a pool holds the calls of one training step and
    closes when the step's backward pass reaches the head (:meth:`mark_backward`).
    An integer: a pool closes after that many calls. Every ``freq``-th closed pool (a step,
    whatever became of its statistics) is due a refresh; a head may defer it to the start of
    the next step (``deferred``). Nothing here reads the device.
    """

    freq: int
    calls_per_update: Optional[int]
    calls: int = 0
    """Calls pooled since the last close."""
    steps: int = 0
    """Closed pools: folded, skipped or empty."""
    boundary: bool = False
    """A backward pass reached the head since its last call (the current step has ended)."""
    deferred: bool = False
    """A due refresh waits for the start of the next step."""

    _STATE = ("calls", "steps", "boundary", "deferred")

    def begin_call(self) -> bool:
        """A call starts; True if it starts a new step (a backward pass ran since the last call)."""
        new_step, self.boundary = self.boundary, False
        return new_step

    def pool_ended(self) -> bool:
        """The open pool is an ended step's ("auto") and must close."""
        return self.calls_per_update is None and self.calls > 0

    def add_call(self) -> bool:
        """A call joined the pool; True if the pool is now full (integer ``calls_per_update``)."""
        self.calls += 1
        return self.calls_per_update is not None and self.calls >= self.calls_per_update

    def close(self, *, empties_pool: bool = True) -> bool:
        """A step ended: the open pool closed, or (``empties_pool=False``) a batch was folded on
        its own beside it. True if this step is due a refresh."""
        if empties_pool:
            self.calls = 0
        self.steps += 1
        return self.steps % self.freq == 0

    def mark_backward(self) -> bool:
        """A backward pass reached the head; True if that ends an open "auto" pool (close it now)."""
        self.boundary = True
        return self.pool_ended()

    def take_deferred(self) -> bool:
        deferred, self.deferred = self.deferred, False
        return deferred

    def reset(self) -> None:
        self.calls = self.steps = 0
        self.boundary = self.deferred = False

    def state_dict(self) -> Dict[str, Any]:
        state = {name: getattr(self, name) for name in self._STATE}
        # A boundary matters only to an open "auto" pool or a deferred refresh: equal states save equal.
        state["boundary"] = bool(self.boundary and (self.deferred or (self.calls and self.calls_per_update is None)))
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name in self._STATE:
            setattr(self, name, type(getattr(self, name))(state[name]))


class CounterMirror:
    """Device counters on their way to the host, one step late, without waiting for the device.

    :meth:`send` starts copying the counters to host memory (non-blocking into pinned memory
    on an accelerator, a plain copy on the CPU) and :meth:`receive` returns the values sent
    before, so the host learns them one step after they were written, the same on every
    device. By then an accelerator has long finished the copy: waiting on its event costs
    nothing. The values in flight are part of the saved state.
    """

    def __init__(self, width: int = 2) -> None:
        self._host: Optional[Tensor] = None
        self._event: Optional[Any] = None
        self._values: Optional[List[int]] = None  # in flight, already on the host (after a load)
        self.known: List[int] = [0] * width
        """The newest values the host has received."""

    def send(self, counters: Tensor) -> None:
        if counters.device.type == "cpu":
            self._host, self._event = counters, None  # the caller's fresh tensor, written by no one
        else:
            if self._host is None or self._host.shape != counters.shape or not self._host.is_pinned():
                self._host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
            self._host.copy_(counters, non_blocking=True)
            self._event = torch.Event(device=counters.device)
            self._event.record()
        self._values = None

    def receive(self) -> List[int]:
        """How much each counter grew since the last values received (the counters sent last)."""
        values = self.peek()
        self._host = self._event = self._values = None
        if values is None:
            return [0] * len(self.known)
        grown = [new - old for new, old in zip(values, self.known)]
        self.known = values
        return grown

    def peek(self) -> Optional[List[int]]:
        if self._values is None and self._host is not None:
            if self._event is not None:
                self._event.synchronize()
            self._values, self._host, self._event = self._host.tolist(), None, None
        return None if self._values is None else list(self._values)

    def state_dict(self) -> Dict[str, Any]:
        return {"in_flight": self.peek(), "known": list(self.known)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._host = self._event = None
        values = state["in_flight"]
        self._values = None if values is None else [int(v) for v in values]
        self.known = [int(v) for v in state["known"]]

    def reset(self) -> None:
        self.load_state_dict({"in_flight": None, "known": [0] * len(self.known)})

    def __getstate__(self) -> Dict[str, Any]:  # pickling and deepcopy: events do not pickle
        return self.state_dict()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.load_state_dict(state)
