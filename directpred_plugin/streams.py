"""Where a head's end-of-step work runs: beside the backward pass on CUDA, inline elsewhere.

:class:`SideStream` runs the fold and refresh a backward pass triggers on a CUDA side stream,
so they overlap the rest of that backward pass (the backbone's), and makes the caller's
stream wait for them when the backward pass ends: a device-side wait, never a host one.
On every other device the same work runs inline, so the numbers are the same code's.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from .calls import inside_backward

__all__ = ["SideStream"]


class SideStream:
    """Runs ``work`` on a per-device CUDA side stream (ordered after the caller's stream); inline elsewhere.

    Inside a backward pass the caller's stream waits for the side stream when the backward
    pass ends (an autograd final callback), so everything the caller issues after
    ``backward()`` (optimizer, EMA, reading or saving the head) sees the finished work; outside
    one it waits at once. Streams are per process: copies and pickles of a head start without.
    """

    def __init__(self) -> None:
        self._streams: Dict[Optional[int], Any] = {}

    def run(self, device: torch.device, work: Callable[[], Any]) -> Any:
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

    def __getstate__(self) -> Dict[str, Any]:
        return {"_streams": {}}
