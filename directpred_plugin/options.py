"""Every option the head, its refresh and the adapters take, validated in one place.

`check_head_options` checks each `DirectPredHead` option on
its own and against the others (an option that means nothing for the chosen variant is
refused, not ignored) and returns them cleaned. The ``check_*``
helpers are the single source of the messages: ``"<name> must be <what>, got <value>"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Sequence

import torch

from .refresh import ITERATIVE_DEFAULTS, ITERATIVE_POWERS, REFRESH_NAMES
from .variants import VARIANTS, RuleOptions, variant_defaults

__all__ = [
    "AUTO",
    "check_head_options",
    "check_refresh_options",
    "iterative_form",
    "check_int",
    "check_real",
    "check_bool",
    "check_choice",
]

#: ``calls_per_update`` value that pools every call of one training step (optimizer step).
AUTO = "auto"
STATS_DTYPES = (torch.float32, torch.float64)


def check_int(name: str, value: Any, *, minimum: int, also: str = "") -> int:
    """``value`` as an ``int`` (NumPy integers included) if it is one and ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' ' + also if also else ''}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, lower: float, upper: float, *,
               lower_open: bool = False, upper_open: bool = False) -> float:
    """``value`` as a ``float`` (NumPy scalars included) if it is a finite number in the interval."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lower if lower_open else value >= lower) and (value < upper if upper_open else value <= upper)
    if not ok:
        interval = f"{'(' if lower_open else '['}{lower:g}, {upper:g}{')' if upper_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def iterative_form(variant: str, options: RuleOptions) -> bool:
    """Whether the iterative refresh can evaluate ``variant`` with ``options`` (else it is exact)."""
    return VARIANTS[variant].power(options) in ITERATIVE_POWERS


def check_refresh_options(options: Any) -> Dict[str, Any]:
    """``refresh_options`` of the iterative refresh, checked by name and range (the defaults not filled in)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"refresh_options must be a dict of keyword options, got {options!r}")
    unknown = sorted(set(options) - set(ITERATIVE_DEFAULTS))
    if unknown:
        raise ValueError(f"refresh_options {unknown} are not options of the iterative refresh; "
                         f"valid options: {list(ITERATIVE_DEFAULTS)}")
    checked: Dict[str, Any] = {}
    for name, value in options.items():
        if name in ("squarings", "sqrt_steps"):
            checked[name] = check_int(name, value, minimum=1)
        else:
            checked[name] = check_real(name, value, 0.0, 1.0, lower_open=True, upper_open=True)
    return checked


def check_head_options(
    dim: Any,
    *,
    rho: Any,
    eps: Any,
    freq: Any,
    variant: Any,
    trainable: Any,
    center: Any,
    calls_per_update: Any,
    stats_dtype: Any,
    sync_dist: Any,
    process_group: Any,
    refresh: Any,
    refresh_options: Any,
    alpha: Any,
    eps_inside: Any,
    ridge: Any,
    weight_momentum: Any,
) -> Dict[str, Any]:
    """The options of a head, validated alone and together (ValueError naming what was expected).

    Returns them cleaned (Python numbers, ``calls_per_update`` None for ``"auto"``, ``alpha``
    resolved, ``refresh_options`` a dict, ``rho``/``eps``/``freq``/``trainable`` given as None
    filled in from the variant's defaults), without building anything, so that adapters can
    check a configuration before they build a model.
    """
    variant = check_choice("variant", variant, list(VARIANTS))
    given = dict(rho=rho, eps=eps, freq=freq, trainable=trainable)
    rho, eps, freq, trainable = ({**variant_defaults(variant), **{k: v for k, v in given.items() if v is not None}}[k]
                                 for k in given)
    dim = check_int("dim", dim, minimum=1)
    freq = check_int("freq", freq, minimum=1)
    cpu = None if calls_per_update == AUTO else check_int("calls_per_update", calls_per_update, minimum=1,
                                                            also=f"or {AUTO!r}")
    rho = check_real("rho", rho, 0.0, 1.0, upper_open=True)
    eps = check_real("eps", eps, 0.0, math.inf)
    ridge = check_real("ridge", ridge, 0.0, math.inf)
    weight_momentum = check_real("weight_momentum", weight_momentum, 0.0, 1.0, upper_open=True)
    for name, value in (("trainable", trainable), ("center", center), ("sync_dist", sync_dist),
                        ("eps_inside", eps_inside)):
        check_bool(name, value)
    refresh = check_choice("refresh", refresh, REFRESH_NAMES)
    if stats_dtype not in STATS_DTYPES:
        raise ValueError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype!r}")
    refresh_options = check_refresh_options(refresh_options)

    # Options that mean nothing for this configuration are refused, not silently ignored.
    takes = VARIANTS[variant].takes
    if alpha is not None and "alpha" not in takes:
        raise ValueError(f"alpha is DirectSet's power: it needs variant='directset', got variant={variant!r}")
    alpha = 0.5 if alpha is None else check_real("alpha", alpha, 0.0, math.inf, lower_open=True)
    if eps_inside and "eps_inside" not in takes:
        users = [name for name, member in VARIANTS.items() if "eps_inside" in member.takes]
        raise ValueError(
            f"eps_inside places eps inside a spectral power, which variant={variant!r} does not have; "
            f"use it with variant in {users}"
        )
    if not iterative_form(variant, RuleOptions(eps=eps, alpha=alpha, eps_inside=eps_inside)):
        if refresh == "iterative":
            raise ValueError(
                f"refresh='iterative' evaluates spectral powers 1/2 and 1 (eps outside); variant={variant!r}"
                f"{' with alpha=%g' % alpha if variant == 'directset' else ''}"
                f"{' and eps_inside' if eps_inside else ''} has no iterative form: use refresh='exact' or 'auto'"
            )
        if refresh_options and refresh in ("auto", "iterative"):
            raise ValueError(
                f"refresh_options configure the iterative refresh, which variant={variant!r} does not use; "
                f"got {dict(refresh_options)}"
            )
    if refresh == "exact" and refresh_options:
        raise ValueError(f"refresh='exact' takes no refresh_options, got {dict(refresh_options)}")
    if trainable and freq == 1:
        raise ValueError(
            "trainable=True lets the optimizer train W_p between refreshes, but freq=1 overwrites it at "
            "every step: use freq > 1 (the paper's hybrid uses 5) or trainable=False"
        )
    if trainable and cpu is not None:
        raise ValueError(
            f"trainable=True needs calls_per_update={AUTO!r}: a trainable W_p is refreshed after the optimizer "
            f"step that used its gradient, and an integer calls_per_update={cpu} would refresh it inside a step"
        )
    if process_group is not None and not sync_dist:
        raise ValueError("process_group is the group the statistics are summed over, but sync_dist=False sums nothing")
    return dict(
        dim=dim, rho=rho, eps=eps, freq=freq, variant=variant, trainable=trainable, center=center,
        calls_per_update=cpu, stats_dtype=stats_dtype, sync_dist=sync_dist, process_group=process_group,
        refresh=refresh, refresh_options=dict(refresh_options), alpha=alpha, eps_inside=eps_inside, ridge=ridge,
        weight_momentum=weight_momentum,
    )
