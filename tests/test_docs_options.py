"""The option tables of the docs name exactly the options of the code; their defaults and
allowed values are filled in from the code (docs/hooks/options.py, also run by mkdocs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_options_hook", ROOT / "docs" / "hooks" / "options.py")
options = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = options
_spec.loader.exec_module(options)


def test_every_option_table_agrees_with_the_code():
    pages = options.marked_pages(ROOT / "docs")
    tables = {}
    for page in pages:
        text, count = options.render(page.read_text(encoding="utf-8"), f"{page.name}: ")
        tables[page.name] = count
        assert "| option | default | accepts | meaning |" in text
    assert tables == {"head.md": 1, "lightly.md": 1, "solo-learn.md": 1}


def test_defaults_and_choices_come_from_the_code():
    from directpred_plugin import VARIANTS

    text, _ = options.render((ROOT / "docs" / "head.md").read_text(encoding="utf-8"))
    row = next(line for line in text.splitlines() if line.startswith("| `variant` |"))
    assert all(f'`"{name}"`' in row for name in VARIANTS)
    rho = next(line for line in text.splitlines() if line.startswith("| `rho` |"))
    import inspect

    from directpred_plugin import DirectPredHead

    assert f"`{inspect.signature(DirectPredHead).parameters['rho'].default}`" in rho
    solo, _ = options.render((ROOT / "docs" / "solo-learn.md").read_text(encoding="utf-8"))
    assert "| `stats_dtype` | `float32` | `float32`, `float64` |" in solo


TABLE = """<!-- options: {target} -->
| option | meaning |
|---|---|
{rows}
"""


@pytest.mark.parametrize("target", ["head", "lightly", "solo"])
def test_a_table_that_drifts_from_the_code_fails(target):
    names = list(options.TARGETS[target].options())
    rows = "\n".join(f"| `{name}` | text |" for name in names)
    options.render(TABLE.format(target=target, rows=rows))  # the full table passes
    with pytest.raises(options.OptionTableError, match=rf"missing \['{names[0]}'\]"):
        options.render(TABLE.format(target=target, rows="\n".join(rows.splitlines()[1:])))
    with pytest.raises(options.OptionTableError, match=r"not options of the code \['frequency'\]"):
        options.render(TABLE.format(target=target, rows=rows + "\n| `frequency` | renamed |"))
