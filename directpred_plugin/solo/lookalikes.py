"""Keys of ``method_kwargs`` that look like the adapter's own but are not: misspellings that would be ignored.

solo-learn never checks ``method_kwargs``, so ``direct_pred: {rho: 0.9}`` beside
``predictor: directpred`` would train with the default ``rho``; `meant_key` says which
of the adapter's keys such a key resembles, so that the cfg check can stop the run.
"""

from __future__ import annotations

from typing import Optional

from ..variants import VARIANTS

__all__ = ["ADAPTER_KEYS", "meant_key"]

#: The ``method_kwargs`` keys the adapter reads.
ADAPTER_KEYS = ("predictor", "directpred", "loss", "isoloss")
#: Keys compared by spelling; ``loss`` is too short for a typo to tell it from another word.
_SPELLED = ("directpred", "predictor", "isoloss")


def _normalised(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "").replace(" ", "")


def _edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of neighbours that turn ``a`` into ``b``."""
    before_previous: list = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            value = min(current[j - 1] + 1, previous[j] + 1, previous[j - 1] + (char_a != char_b))
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                value = min(value, before_previous[j - 2] + 1)
            current.append(value)
        before_previous, previous = previous, current
    return previous[-1]


def meant_key(key: str) -> Optional[str]:
    """The adapter's key that ``key`` looks like a misspelling of, or None.

    ``key`` resembles one of `ADAPTER_KEYS` when, ignoring case, ``_`` and ``-``, it
    equals it, contains ``directpred``, or is within one edit per five letters of it; a
    member's name (``ns: {freq: 2}``) resembles ``directpred``, where every member's options go.
    None of solo-learn's own ``method_kwargs`` keys resembles one.
    """
    if key in ADAPTER_KEYS:
        return None
    normalised = _normalised(key)
    for ours in _SPELLED:
        if normalised == ours or _edit_distance(normalised, ours) <= len(ours) // 5:
            return ours
    if "directpred" in normalised or normalised in {_normalised(name) for name in VARIANTS}:
        return "directpred"
    return None
