"""The README is a landing page that renders on GitHub, and its results table is the committed one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _rows(text: str, header: str) -> dict:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_readme_is_short_and_its_tables_are_tables():
    assert len(README.splitlines()) <= 200
    assert "\\n|" not in README  # a table written as one line of literal \n renders as text


def test_readme_results_are_the_committed_results():
    committed = (ROOT / "docs" / "benchmarks" / "compare-digits" / "results.md").read_text(encoding="utf-8")
    ours = _rows(README, "| predictor | kNN top-1")
    theirs = _rows(committed, "| predictor | kNN top-1")
    header = [c.strip() for c in next(l for l in README.splitlines() if l.startswith("| predictor |")).strip("|").split("|")]
    their_header = [c.strip() for c in next(l for l in committed.splitlines() if l.startswith("| predictor |")).strip("|").split("|")]
    assert len(ours) == 6
    for name, cells in ours.items():
        for column, value in zip(header, cells):
            assert theirs[name][their_header.index(column)] == value, (name, column)
