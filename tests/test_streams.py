"""SideStream: where the end of a step runs. The CUDA ordering is checked with stand-in streams on the CPU."""

import contextlib

import torch

from directpred_plugin.streams import SideStream


def test_off_cuda_the_work_runs_inline():
    side = SideStream()
    assert side.run(torch.device("cpu"), lambda: 7) == 7
    assert side._streams == {}


class _Event:
    def __init__(self, log, name):
        self.log, self.name = log, name


class _Stream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")

    def record_event(self):
        self.log.append(f"{self.name} records")
        return _Event(self.log, self.name)

    def wait_event(self, event):
        self.log.append(f"{self.name} waits for {event.name}'s event")


def _stand_in_cuda(monkeypatch, log):
    caller = _Stream(log, "caller")
    current = [caller]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream(log, "side"))

    @contextlib.contextmanager
    def stream(s):
        current[0] = s
        try:
            yield
        finally:
            current[0] = caller

    monkeypatch.setattr(torch.cuda, "stream", stream)
    return current


def test_inside_backward_the_caller_waits_for_the_side_stream_when_the_backward_pass_ends(monkeypatch):
    log = []
    current = _stand_in_cuda(monkeypatch, log)
    side = SideStream()
    x = torch.randn(4, 3, requires_grad=True)
    hidden = x * 2
    out = hidden * 3

    def work():
        log.append(f"work on {current[0].name}")

    out.register_hook(lambda grad: side.run(torch.device("cuda", 0), work))
    hidden.register_hook(lambda grad: log.append("rest of the backward pass"))
    out.sum().backward()
    assert log == ["side waits for caller", "work on side", "side records", "rest of the backward pass",
                   "caller waits for side's event"]
    assert set(side._streams) == {0}


def test_outside_backward_the_caller_waits_at_once(monkeypatch):
    log = []
    _stand_in_cuda(monkeypatch, log)
    side = SideStream()
    side.run(torch.device("cuda", 0), lambda: log.append("work"))
    log.append("after")
    assert log == ["side waits for caller", "work", "side records", "caller waits for side's event", "after"]
