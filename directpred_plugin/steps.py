"""The host side of a head: when its steps end, which ``W_p`` each call used, what the host learns late.

`Steps` is the one Python object beside a head's buffers. It decides when a pool
closes (after an integer number of calls, at an optimizer step, or at a backward pass) and
when a refresh is due and at which level, hands each call an immutable copy of ``W_p`` and
remembers it for activation checkpointing's recomputation, runs the end of a step beside the
backward pass on CUDA, and carries two device counters to the host one step late. What of it
must survive a checkpoint is a handful of integers (`Steps.state`).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from types import FrameType
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import CheckpointFunction

__all__ = ["Steps", "NORMAL", "THOROUGH", "EXACT", "CHECKPOINT_ERROR", "linear", "autocast_disabled",
           "inside_backward", "in_reentrant_checkpoint", "upstream_parameters"]

#: Refresh levels: the configured strategy, its thorough form, the exact rule.
NORMAL, THOROUGH, EXACT = 0, 1, 2
LEVEL_NAMES = ("normal", "thorough", "exact")
_AFTER_REFUSAL = {NORMAL: THOROUGH, THOROUGH: EXACT, EXACT: EXACT}
_REENTRANT_FORWARD = CheckpointFunction.forward.__code__
_RECORD_KEY = "directpred_plugin.call"

CHECKPOINT_ERROR = (
    "DirectPredHead cannot be recomputed exactly under activation checkpointing here: {}. Use "
    "torch.utils.checkpoint with use_reentrant=False and calls_per_update='auto', and run each "
    "step's backward pass before the next step's refresh, or keep the head outside the checkpointed "
    "function."
)


class _CallRecord:
    """The ``W_p`` one training call used; lives as long as the autograd node of its output."""

    __slots__ = ("weight", "done", "__weakref__")

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.done = False


class Steps:
    """A head's host-side state: pools, steps, refresh levels, ``W_p`` copies, counters in flight.

    ``calls_per_update=None`` (``"auto"``) pools every training call of one step. If the head's
    input depends on parameters (or ``W_p`` is trainable), the step ends at the next optimizer
    step (torch's optimizer hook), or at the next call if those parameters changed in place
    otherwise. Where no such parameter exists, the backward pass that reaches a call of the
    pool ends the step. An integer closes the pool after
    that many calls. Every ``freq``-th step is due a refresh. Nothing here reads the device
    except `peek_counters` (a finished copy) and an ambiguous recomputation.
    """

    def __init__(self, freq: int, calls_per_update: Optional[int]) -> None:
        self.freq = freq
        self.calls_per_update = calls_per_update
        self._streams: Dict[Optional[int], Any] = {}
        self.reset()

    # ------------------------------------------------------------------ windows and steps
    @property
    def auto(self) -> bool:
        return self.calls_per_update is None

    def reset(self) -> None:
        self.calls = 0
        """Training calls pooled since the last close."""
        self.steps = 0
        """Closed pools: folded, skipped or empty."""
        self.next_level = self.last_level = NORMAL
        self.exact_refreshes = self.thorough_refreshes = 0
        self.known = [0, 0]
        """The newest device counters (skips, refusals) the host has received."""
        self._in_flight: Optional[List[int]] = None
        self._host: Optional[Tensor] = None
        self._event: Optional[Any] = None
        self._watched: Optional[List[Tensor]] = None  # None: not known yet for the open pool
        self._watched_version = 0
        self._weight_last = False
        self._records: List[weakref.ref] = []
        self._copy: Optional[Tuple[Tuple[int, int, torch.dtype], Tensor]] = None
        self._casts: Dict[torch.dtype, Tensor] = {}

    def watching(self) -> bool:
        """Whether the open "auto" pool knows the parameters it watches (not before its first call,
        nor after a load)."""
        return not self.auto or self._watched is not None

    def watch(self, watched: List[Tensor], trainable_weight: Optional[Tensor] = None) -> None:
        """Watch these parameters (those of the pool's first call, and a trainable ``W_p``, whose own
        optimizer's step then ends the step) for the step's end."""
        self._weight_last = trainable_weight is not None
        self._watched = watched + [trainable_weight] if trainable_weight is not None else watched
        self._watched_version = _version_sum(self._watched)

    def add_call(self) -> bool:
        """A call joined the pool; True if the pool is now full (integer ``calls_per_update``)."""
        self.calls += 1
        return self.calls_per_update is not None and self.calls >= self.calls_per_update

    def backward_reached(self) -> bool:
        """A backward pass reached a call of the open pool; True if that ends the step (nothing is watched)."""
        if not self.auto or not self.calls:
            return False
        return not self._watched

    def waits_for_update(self) -> bool:
        """An open "auto" pool that watches parameters waits for them to be updated.

        Not only once a backward pass reached it: a loss built without the head's output
        (IsoLoss hands its gradient to the input) never runs the output's backward.
        """
        return self.auto and self.calls > 0 and bool(self._watched)

    def pool_ended(self, stepped: Optional[set] = None) -> bool:
        """Whether the open pool's step is over.

        ``stepped``: the ids of the parameters of an optimizer that just stepped (torch's optimizer
        hook; fused optimizers do not bump a parameter's version): the step is over if it holds a
        watched parameter, or, where the watched list ends with a trainable ``W_p``, that one.
        Without it: whether a watched parameter changed in place since the pool opened.
        """
        if not self.waits_for_update():
            return False
        watched = self._watched or []
        if stepped is not None:
            required = watched[-1:] if self._weight_last else watched
            return any(id(tensor) in stepped for tensor in required)
        return _version_sum(watched) != self._watched_version

    def close(self, *, empties_pool: bool = True) -> bool:
        """A step ended: the open pool closed, or (``empties_pool=False``) a batch was folded on
        its own beside it. True if this step is due a refresh."""
        if empties_pool:
            self.calls = 0
            self._watched = None
        self.steps += 1
        return self.steps % self.freq == 0

    # ------------------------------------------------------------------ refresh levels
    def refresh_level(self, iterative: bool) -> int:
        """The level of the refresh about to run (and count it); the next one is normal again.

        Only an iterative refresh climbs: an exact one that was refused has no surer form.
        """
        level = NORMAL
        if self.next_level != NORMAL and iterative:
            if self.next_level == THOROUGH:
                level = THOROUGH
                self.thorough_refreshes += 1
            else:
                level = EXACT
                self.exact_refreshes += 1
        self.next_level, self.last_level = NORMAL, level
        return level

    def rejection_learned(self) -> None:
        """The host learned that the last refresh was refused: the next one climbs a level."""
        self.next_level = _AFTER_REFUSAL[self.last_level]

    # ------------------------------------------------------------------ W_p for each call
    def weight_for_call(self, weight: Tensor, trainable: bool, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(W_p for the output, its immutable copy)``; a buffer ``W_p`` is copied and cast once
        per change of the tensor (a refresh, a load, an averaging that writes it), not per call."""
        snapshot = self._snapshot(weight)
        if trainable:  # differentiable, and unaffected by a later in-place refresh
            return weight.clone(), snapshot
        return self._cast(dtype), snapshot

    def record(self, out: Tensor, snapshot: Tensor, on_backward: Callable[[], None]) -> None:
        """Remember the ``W_p`` of a call whose output a backward pass can reach.

        The record lives in the metadata of the output's autograd node, so it is pending
        exactly while that graph can still be run and the node has not run yet; no hook is left
        on the caller's tensors.
        """
        node: Any = out.grad_fn  # a Node whose metadata is a dict (typed as a method in torch's stubs)
        record = _CallRecord(snapshot)
        node.metadata[_RECORD_KEY] = record

        def reached(grad_inputs: Any, grad_outputs: Any) -> None:
            record.done = True
            on_backward()

        node.register_hook(reached)
        self._records = [ref for ref in self._records if _pending(ref)]
        self._records.append(weakref.ref(record))

    def weight_for_recomputation(self, weight: Tensor, trainable: bool, dtype: torch.dtype) -> Tensor:
        """The ``W_p`` the recomputed call used: that of every call still waiting for its backward pass."""
        pending = [record for record in (ref() for ref in self._records) if record is not None and not record.done]
        if not pending:
            raise RuntimeError(CHECKPOINT_ERROR.format("no call of this head is waiting for its backward pass"))
        snapshot = pending[0].weight
        for record in pending[1:]:
            # Rare: several copies are pending (a load, or DDP's buffer broadcast, between the calls);
            # equal values still make the recomputation exact.
            if record.weight is not snapshot and not torch.equal(record.weight, snapshot):
                raise RuntimeError(CHECKPOINT_ERROR.format(
                    "W_p changed between calls whose backward passes are still pending (a refresh between "
                    "a forward and its backward, as in interleaved or pipelined schedules)"))
        if trainable:  # exactly the values of the forward pass, the gradient to the parameter
            return snapshot + (weight - weight.detach())
        return snapshot.to(dtype)

    def drop_copies(self) -> None:
        """Forget the copies of ``W_p`` (after a load or a move); pending records keep theirs."""
        self._copy, self._casts = None, {}

    def _snapshot(self, weight: Tensor) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self._copy is None or self._copy[0] != key:
            self._copy, self._casts = (key, weight.detach().clone()), {}
        return self._copy[1]

    def _cast(self, dtype: torch.dtype) -> Tensor:
        assert self._copy is not None
        copy = self._copy[1]
        if dtype == copy.dtype:
            return copy
        if dtype not in self._casts:
            self._casts[dtype] = copy.to(dtype)
        return self._casts[dtype]

    # ------------------------------------------------------------------ where the step's end runs
    def run_beside_backward(self, device: torch.device, work: Callable[[], Any]) -> Any:
        """Run ``work`` on a per-device CUDA side stream ordered after the caller's; inline elsewhere.

        Inside a backward pass the caller's stream waits for it when the backward pass ends (an
        autograd final callback), so whatever the caller issues after ``backward()`` sees the
        finished work; outside one it waits at once. Both waits are on the device, never the host.
        """
        if device.type != "cuda":
            return work()
        caller = torch.cuda.current_stream(device)
        side = self._streams.get(device.index)
        if side is None:
            side = self._streams[device.index] = torch.cuda.Stream(device)
        side.wait_stream(caller)  # the statistics and W_p the caller wrote so far
        with torch.cuda.stream(side):
            result = work()
        done = side.record_event()
        if inside_backward():
            torch.autograd.Variable._execution_engine.queue_callback(lambda: caller.wait_event(done))
        else:
            caller.wait_event(done)
        return result

    # ------------------------------------------------------------------ device counters, one step late
    def send_counters(self, counters: Tensor) -> None:
        """Start copying ``counters`` to the host (non-blocking into pinned memory on an accelerator)."""
        if counters.device.type == "cpu":
            self._host, self._event = counters, None  # the caller's fresh tensor, written by no one
        else:
            if self._host is None or self._host.shape != counters.shape or not self._host.is_pinned():
                self._host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
            self._host.copy_(counters, non_blocking=True)
            self._event = torch.Event(device=counters.device)
            self._event.record()
        self._in_flight = None

    def receive_counters(self) -> List[int]:
        """How much each counter grew since the values received before (the ones sent last)."""
        values = self.peek_counters()
        self._host = self._event = self._in_flight = None
        if values is None:
            return [0] * len(self.known)
        grown = [new - old for new, old in zip(values, self.known)]
        self.known = values
        return grown

    def peek_counters(self) -> Optional[List[int]]:
        """The counters in flight (a step old: an accelerator has long finished their copy)."""
        if self._in_flight is None and self._host is not None:
            if self._event is not None:
                self._event.synchronize()
            self._in_flight, self._host, self._event = [int(v) for v in self._host.tolist()], None, None
        return None if self._in_flight is None else list(self._in_flight)

    # ------------------------------------------------------------------ saved state
    _SAVED = ("calls", "steps", "next_level", "last_level", "exact_refreshes", "thorough_refreshes")
    STATE_SIZE = len(_SAVED) + 5

    def state(self) -> List[int]:
        """What a resumed run needs to decide as an uninterrupted one, as integers."""
        in_flight = self.peek_counters()
        return ([int(getattr(self, name)) for name in self._SAVED] + list(self.known)
                + ([0, 0, 0] if in_flight is None else [1, *in_flight]))

    def load_state(self, values: List[int]) -> None:
        calls, steps, next_level, last_level, exact, thorough, *rest = (int(v) for v in values)
        if not {next_level, last_level} <= set(_AFTER_REFUSAL):
            raise ValueError(f"unknown refresh levels {(next_level, last_level)} in a DirectPredHead checkpoint")
        self.reset()
        self.calls, self.steps = calls, steps
        self.next_level, self.last_level, self.exact_refreshes, self.thorough_refreshes = (
            next_level, last_level, exact, thorough)
        self.known = rest[:2]
        self._in_flight = rest[3:5] if rest[2] else None

    def __getstate__(self) -> Dict[str, Any]:
        # Copies and pickles keep the saved state; streams, events, watched parameters, the
        # copies of W_p and the records of the original's calls stay with the original.
        state = self.state()
        return {"freq": self.freq, "calls_per_update": self.calls_per_update, "state": state}

    def __setstate__(self, saved: Dict[str, Any]) -> None:
        self.__init__(saved["freq"], saved["calls_per_update"])  # type: ignore[misc]
        self.load_state(saved["state"])


def _version_sum(tensors: List[Tensor]) -> int:
    # versions only grow, so any in-place update of any of them changes the sum
    return sum(tensor._version for tensor in tensors)


def _pending(ref: weakref.ref) -> bool:
    record = ref()
    return record is not None and not record.done


def upstream_parameters(z: Tensor, limit: int = 100_000) -> List[Tensor]:
    """The leaf tensors requiring grad that ``z`` was computed from (the graph's ``AccumulateGrad`` nodes)."""
    found: List[Tensor] = []
    if z.grad_fn is None:
        return found
    seen: set = set()
    stack: List[Any] = [z.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            found.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


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
