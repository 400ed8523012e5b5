"""MkDocs hook: the option tables of the documentation take their names, defaults and allowed
values from the code.

A table written in a page as

    <!-- options: head -->
    | option | meaning |
    |---|---|
    | `rho` | EMA decay of `F_hat` |
    ...

is checked against the options of the named target (see :data:`TARGETS`) and rewritten with
a ``default`` column read from the code and, for options with a fixed set of values, an
``accepts`` column computed from the code (registries, and for dtypes the values the code
accepts when tried). A table that misses an option of the code, or lists one the code does
not have, stops the build with an error naming them. ``tests/test_docs_options.py`` applies
the same function to every page, so ``pytest`` fails on the same drift.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

MARKER = re.compile(r"^<!--\s*options:\s*(?P<target>[\w.-]+)\s*-->\s*$")


class OptionTableError(ValueError):
    """An option table disagrees with the code."""


@dataclass(frozen=True)
class Target:
    """Where one table's options come from."""

    #: option name -> default, in the code's order
    options: Callable[[], Dict[str, Any]]
    #: formats a default as the reader writes it (Python or YAML)
    show: Callable[[Any], str]
    #: option name -> the values the code accepts, where that set is finite
    accepts: Callable[[], Dict[str, List[str]]]


def _python(value: Any) -> str:
    if inspect.isclass(value) or callable(value) and not hasattr(value, "dtype"):
        return getattr(value, "__name__", repr(value))
    text = repr(value)
    if text.startswith("'"):
        text = '"' + text[1:-1] + '"'
    return text


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _signature_defaults(function: Callable[..., Any], skip: Sequence[str] = ()) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name in ("self", *skip) or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        result[name] = "(required)" if parameter.default is parameter.empty else parameter.default
    return result


def _accepted(candidates: Sequence[Any], tries: Callable[[Any], Any]) -> List[Any]:
    accepted = []
    for value in candidates:
        try:
            tries(value)
        except (TypeError, ValueError):
            continue
        accepted.append(value)
    return accepted


def _head_options() -> Dict[str, Any]:
    from directpred_plugin import DirectPredHead

    return _signature_defaults(DirectPredHead.__init__, skip=("dim",))


def _head_accepts() -> Dict[str, List[str]]:
    import torch

    from directpred_plugin import VARIANTS, DirectPredHead
    from directpred_plugin.refresh import REFRESH_NAMES

    dtypes = _accepted([torch.float16, torch.bfloat16, torch.float32, torch.float64],
                       lambda dtype: DirectPredHead(1, stats_dtype=dtype))
    return {
        "variant": [_python(v) for v in VARIANTS],
        "refresh": [_python(v) for v in REFRESH_NAMES],
        "stats_dtype": [_python(v) for v in dtypes],
    }


def _lightly_options() -> Dict[str, Any]:
    from directpred_plugin.lightly import DirectPredPredictionHead

    return _signature_defaults(DirectPredPredictionHead.__init__)


def _solo_options() -> Dict[str, Any]:
    from directpred_plugin import solo
    from directpred_plugin.solo.config import ADAPTER_DEFAULTS

    # A key left out gets the head's default (the chosen name's, for predictor: ns and the like);
    # directpred_options fills in only what differs from the head: calls_per_update. The
    # adapter's own keys (the logging interval) have their defaults in the adapter.
    head = _head_options()
    given = solo.directpred_options({})
    defaults = {**head, "stats_dtype": "float32", **ADAPTER_DEFAULTS, **given}
    return {name: defaults[name] for name in solo.DIRECTPRED_OPTIONS}


def _solo_accepts() -> Dict[str, List[str]]:
    from directpred_plugin import VARIANTS, solo
    from directpred_plugin.refresh import REFRESH_NAMES

    dtypes = _accepted(["float16", "bfloat16", "float32", "float64"],
                       lambda dtype: solo.directpred_options({"stats_dtype": dtype}))
    return {"variant": list(VARIANTS), "refresh": list(REFRESH_NAMES), "stats_dtype": dtypes}


#: ``<!-- options: NAME -->`` -> where the table's options come from.
TARGETS: Dict[str, Target] = {
    # DirectPredHead(dim, *, ...): every keyword option
    "head": Target(_head_options, _python, _head_accepts),
    # DirectPredPredictionHead(input_dim, hidden_dim, output_dim, *, calls_per_update, **head options)
    "lightly": Target(_lightly_options, _python, lambda: {}),
    # solo-learn's method_kwargs.directpred, defaults as directpred_options({}) fills them in
    "solo": Target(_solo_options, _yaml, _solo_accepts),
}


def _cells(line: str) -> List[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _option_name(cell: str) -> str:
    match = re.fullmatch(r"`([\w.]+)`", cell)
    if not match:
        raise OptionTableError(f"an option table's first cell must be an option in backticks, got {cell!r}")
    return match.group(1)


def render_table(target_name: str, lines: Sequence[str], where: str = "") -> List[str]:
    """The table ``lines`` (header, rule, rows) checked against the code and completed from it."""
    if target_name not in TARGETS:
        raise OptionTableError(f"{where}unknown option table {target_name!r}; known: {sorted(TARGETS)}")
    target = TARGETS[target_name]
    code = target.options()
    accepts = target.accepts()
    header = _cells(lines[0])
    if len(lines) < 3 or header[:2] != ["option", "meaning"]:
        raise OptionTableError(f"{where}an option table needs the header '| option | meaning |' and rows")
    rows = [_cells(line) for line in lines[2:]]
    names = [_option_name(row[0]) for row in rows]
    missing = [name for name in code if name not in names]
    unknown = [name for name in names if name not in code]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if missing or unknown or duplicated:
        raise OptionTableError(
            f"{where}the {target_name!r} option table disagrees with the code: "
            + "; ".join(part for part in (
                f"missing {missing}" if missing else "",
                f"not options of the code {unknown}" if unknown else "",
                f"listed twice {duplicated}" if duplicated else "",
            ) if part)
            + f" (the code's options: {list(code)})"
        )
    out = [_row(["option", "default", "accepts", "meaning"]), "|---|---|---|---|"]
    for name, row in zip(names, rows):
        default = code[name]
        shown = default if default == "(required)" else f"`{target.show(default)}`"
        allowed = ", ".join(f"`{value}`" for value in accepts.get(name, ())) or "–"
        out.append(_row([f"`{name}`", shown, allowed, " | ".join(row[1:])]))
    return out


def render(markdown: str, where: str = "") -> Tuple[str, int]:
    """``markdown`` with every marked option table completed; also the number of tables."""
    lines = markdown.splitlines()
    out: List[str] = []
    tables = 0
    i = 0
    while i < len(lines):
        match = MARKER.match(lines[i])
        out.append(lines[i])
        i += 1
        if not match:
            continue
        while i < len(lines) and not lines[i].strip():
            out.append(lines[i])
            i += 1
        start = i
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            i += 1
        if i == start:
            raise OptionTableError(f"{where}<!-- options: {match['target']} --> is not followed by a table")
        out += render_table(match["target"], lines[start:i], where)
        tables += 1
    return "\n".join(out) + ("\n" if markdown.endswith("\n") else ""), tables


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> Optional[str]:
    from mkdocs.exceptions import PluginError

    try:
        return render(markdown, f"{page.file.src_uri}: ")[0]
    except OptionTableError as err:
        raise PluginError(str(err)) from None


def marked_pages(docs_dir: Path) -> List[Path]:
    """The pages with at least one option table."""
    return sorted(p for p in docs_dir.rglob("*.md") if "<!-- options:" in p.read_text(encoding="utf-8"))
