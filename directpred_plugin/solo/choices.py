"""The values ``method_kwargs.predictor`` takes, and the member of the family a choice names.

``mlp`` keeps solo-learn's own predictor; every name of `directpred_plugin.VARIANTS`
builds ``DirectPredHead(dim, variant=name)`` with that name's defaults. A ``variant`` given
beside ``predictor: directpred`` names the member as ``predictor: <member>`` does.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from ..variants import VARIANTS, member_options

__all__ = ["MLP", "predictor_choices", "closed_form", "resolve_member", "resolved_options"]

#: ``method_kwargs.predictor`` value for solo-learn's own predictor.
MLP = "mlp"


def predictor_choices() -> Dict[str, Optional[Dict[str, Any]]]:
    """The values ``method_kwargs.predictor`` accepts: ``mlp`` (None: the method's own predictor)
    and every name of `directpred_plugin.VARIANTS`, with the options that name stands for."""
    choices: Dict[str, Optional[Dict[str, Any]]] = {MLP: None}
    choices.update((name, {**VARIANTS[name].defaults, "variant": name}) for name in VARIANTS)
    return choices


def closed_form(choice: Any) -> bool:
    """Whether ``choice`` (a ``method_kwargs.predictor`` value) builds a DirectPred head."""
    return isinstance(choice, str) and choice in VARIANTS


def resolve_member(predictor: str, options: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The member to build for ``predictor: <predictor>`` and the options to build it with, ``variant`` taken out.

    Raises ``ValueError`` when ``variant`` names another member than ``predictor`` does.
    """
    variant = options.get("variant")
    # `predictor: directpred` with `variant: ns` names the member as `predictor: ns` does,
    # with that member's defaults (configs written before every member was a choice).
    if predictor == "directpred" and isinstance(variant, str) and closed_form(variant):
        predictor = variant
    given = member_options(predictor, options)
    del given["variant"]  # the member's name says it
    return predictor, given


def resolved_options(predictor: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The defaults of the member ``predictor`` names, under the options given: what the head gets."""
    member, given = resolve_member(predictor, options)
    return {**VARIANTS[member].defaults, **given, "variant": member}
