"""What a head's checkpoint holds across versions: the checks and the migration a load runs first.

Version 4 (this one) keeps the statistics under ``stats.`` (the open pool, which is a rank's
own, as their extra state), the refresh counters under ``refresher.`` and the host schedule
as extra state. Version 3 kept the pool as buffers; versions 1 and 2 kept everything in flat
buffers; :func:`migrate_state_dict` rewrites them by the saved version number, as
``torch.nn.BatchNorm`` migrates its running statistics.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

__all__ = ["migrate_state_dict"]

#: Version 1 and 2 names of the buffers that moved into the owners.
_MOVED = {
    "corr": "stats.corr",
    "mean": "stats.mean",
    "pending_outer": "stats.pending_outer",
    "pending_sum": "stats.pending_sum",
    "pending_count": "stats.pending_count",
    "num_updates": "stats.num_updates",
    "num_skipped": "stats.num_skipped",
    "refreshed_at": "refresher.refreshed_at",
    "refresh_rejections": "refresher.refresh_rejections",
}
#: Version 2 host mirrors, re-derived below and then dropped.
_DROPPED = ("pending_calls", "pending_closed", "num_empty")


def migrate_state_dict(head: Any, state_dict: Dict[str, Any], prefix: str, metadata: Dict[str, Any]) -> None:
    """Refuse a checkpoint of another configuration; rewrite one of an earlier version into version 4."""
    where = prefix[:-1] or "the head"
    for key in ("dim", "variant"):
        if key in metadata and metadata[key] != getattr(head.options, key):
            raise RuntimeError(
                f"cannot load a DirectPredHead checkpoint with {key}={metadata[key]!r} into a head with "
                f"{key}={getattr(head.options, key)!r} ({where}); build the head with the checkpoint's settings."
            )
    weight = state_dict.get(prefix + "weight")
    if isinstance(weight, Tensor) and weight.shape != head.weight.shape:
        raise RuntimeError(
            f"cannot load a DirectPredHead checkpoint with dim={weight.shape[-1]} into a head with "
            f"dim={head.options.dim} ({where})."
        )
    version = metadata.get("version", 1)
    if version >= 4 or prefix + "weight" not in state_dict:
        return
    if version < 3:
        _flat_into_owners(head, state_dict, prefix)
    _pool_into_extra_state(head, state_dict, prefix)


def _pool_into_extra_state(head: Any, state_dict: Dict[str, Any], prefix: str) -> None:
    """Version 3 kept the open pool as buffers ``stats.pending_*``; version 4 as the statistics' extra state."""
    names = {"outer": "pending_outer", "total": "pending_sum", "rows": "pending_count"}
    if head.options.center:
        names["shift"] = "pending_shift"
    pool = {field: state_dict.pop(prefix + "stats." + name, None) for field, name in names.items()}
    if all(isinstance(value, Tensor) for value in pool.values()):
        state_dict[prefix + "stats." + _EXTRA_STATE_KEY_SUFFIX] = {"pool": pool}


def _flat_into_owners(head: Any, state_dict: Dict[str, Any], prefix: str) -> None:
    """Versions 1 and 2: flat buffers and host mirrors into the owners' names of version 3."""

    def pop(name: str) -> Any:
        return state_dict.pop(prefix + name, None)

    # A strategy's own state (a warm start, a measured choice) is no longer kept.
    for key in [k for k in state_dict if k.startswith(prefix + "refresher.")]:
        del state_dict[key]
    old = {name: pop(name) for name in (*_MOVED, *_DROPPED)}
    # what version 1 lacked (no pool, no refresh counters), in the shapes of this head
    own = {key[len(prefix):]: value for key, value in head.state_dict(prefix=prefix, keep_vars=True).items()}
    pool = head.stats.pool()
    own.update({"stats.pending_outer": pool.outer, "stats.pending_sum": pool.total, "stats.pending_count": pool.rows})
    updates = old["num_updates"]
    for name, new in _MOVED.items():
        value = old[name]
        if value is None and new in own:
            value = updates.clone() if name == "refreshed_at" else torch.zeros_like(own[new], device="cpu")
        if value is not None:
            state_dict[prefix + new] = value
    if head.options.center:
        # Version 3 keeps the covariance itself; earlier versions kept F_hat next to the mean.
        corr, mean = state_dict[prefix + "stats.corr"], state_dict[prefix + "stats.mean"]
        covariance = corr.double() - torch.outer(mean.double(), mean.double())
        state_dict[prefix + "stats.corr"] = covariance.to(corr.dtype)
        state_dict[prefix + "stats.pending_shift"] = torch.zeros_like(mean)  # the old pool holds raw sums

    def count(value: Any) -> int:
        return int(value) if isinstance(value, Tensor) else 0

    calls = count(old["pending_calls"])
    # Version 2 was saved between steps: an open "auto" pool belongs to a finished step.
    boundary = bool(old["pending_closed"]) if old["pending_closed"] is not None else calls > 0
    steps = count(updates) + count(old["num_skipped"]) + count(old["num_empty"])
    state_dict[prefix + _EXTRA_STATE_KEY_SUFFIX] = {
        "schedule": {"calls": calls, "steps": steps, "boundary": boundary and head.options.auto_steps,
                     "deferred": False},
        "mirror": {"in_flight": None, "known": [count(old["num_skipped"]), count(old["refresh_rejections"])]},
    }
    state_dict[prefix + "refresher." + _EXTRA_STATE_KEY_SUFFIX] = {"exact_next": False, "exact_refreshes": 0}
