"""Counting, on the CPU, what would make the host wait for an accelerator.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` finds such waits; no GPU is needed
to find their causes, because they are the same operations on every device: reading a
value (``item``, ``bool``, ``int``, ``tolist``: ``aten._local_scalar_dense``), operations
whose output shape depends on the data (``nonzero``, boolean-mask indexing, ``unique``),
and linear-algebra kernels that check their ``info`` on the host (``eigh`` and friends).
:class:`SyncCounter` counts those while it is active, treating every tensor as if it lived
on the device, except the one read that is a plain host-memory read on an accelerator:
:meth:`~directpred_plugin.steps.Steps.peek_counters` reading its own host copy of the
device counters (pinned memory, after an event of a copy issued a step earlier), counted
apart as ``mirror_reads``.
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from directpred_plugin.steps import Steps

aten = torch.ops.aten

#: Operators that wait for the device before they return (on CUDA).
SYNCING = {
    aten._local_scalar_dense.default: "read",
    aten.is_nonzero.default: "read",
    aten.nonzero.default: "data-dependent shape",
    aten.masked_select.default: "data-dependent shape",
    aten._unique2.default: "data-dependent shape",
    aten.unique_dim.default: "data-dependent shape",
    aten.unique_consecutive.default: "data-dependent shape",
    aten._linalg_eigh.default: "eigh",
    aten.linalg_eigh.default: "eigh",
    aten._linalg_check_errors.default: "linalg info check",
    aten.linalg_cholesky_ex.default: "linalg info check",
    aten.linalg_inv_ex.default: "linalg info check",
    aten._linalg_svd.default: "linalg info check",
}


class SyncCounter(TorchDispatchMode):
    """Counts would-be device->host waits by cause (``counts``) and the counters' host reads.

    ``tolist`` and ``numpy`` read memory without dispatching an operator, so they are
    wrapped while the counter is active; so is :meth:`Steps.peek_counters`, whose read of
    its own host copy is ``mirror_reads`` and not a wait.
    """

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.mirror_reads = 0
        self._in_mirror = 0
        self._patched = []

    @property
    def total(self):
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cause = SYNCING.get(func)
        if cause is None and func is aten.index.Tensor:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                cause = "data-dependent shape"
        if cause is not None and not self._in_mirror:
            self.counts[f"{func.name()} ({cause})"] += 1
        return func(*args, **kwargs)

    def _wrap(self, owner, name, wrapper):
        original = getattr(owner, name)
        self._patched.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def __enter__(self):
        counter = self

        def reading(original):
            def read(tensor, *args, **kwargs):
                if not counter._in_mirror:
                    counter.counts[f"{original.__name__} (read)"] += 1
                return original(tensor, *args, **kwargs)
            return read

        def mirror(original):
            def peek(self_, *args, **kwargs):
                if self_._in_flight is None and self_._host is not None:  # a read of the copy, not a cached value
                    counter.mirror_reads += 1
                counter._in_mirror += 1
                try:
                    return original(self_, *args, **kwargs)
                finally:
                    counter._in_mirror -= 1
            return peek

        self._wrap(torch.Tensor, "tolist", reading)
        self._wrap(torch.Tensor, "numpy", reading)
        self._wrap(Steps, "peek_counters", mirror)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            while self._patched:
                owner, name, original = self._patched.pop()
                setattr(owner, name, original)
