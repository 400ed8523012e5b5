"""Every code block of README.md, docs/ and integrations/*/README.md runs (or is checked), so a
renamed option, function or command-line flag breaks the suite.

Blocks are found by Sybil's Markdown lexer, one Sybil document per file:

- ``python`` blocks run in order, in one namespace per file.
- ``bash`` blocks are checked command by command (``&&`` and new lines separate commands,
  ``\\`` continues a line): ``pip install`` must name extras that ``pyproject.toml`` defines
  (nothing is installed); ``directpred-bench ...`` must parse with the real command line,
  and runs when the block is marked ``<!-- test: run ARGS -->`` (``ARGS``, small sizes, are
  appended; argparse keeps the last value); ``python SCRIPT.py`` must name an existing script
  and runs the same way when marked (``<!-- test: cwd FOLDER run ARGS -->`` runs it in
  ``FOLDER``); ``python -m pytest`` / ``mkdocs`` / setup commands are checked to refer to
  what exists. A block marked ``<!-- test: needs solo-learn -->`` is skipped without
  solo-learn. A command with no rule fails, so a new kind of block gets a rule.
- ``<!-- test: sub OLD -> NEW -->`` replaces text in the block before it runs (to shrink a
  measurement).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

sybil = pytest.importorskip("sybil", reason="the dev extra installs Sybil")
from sybil import Sybil  # noqa: E402
from sybil.parsers.markdown import CodeBlockParser  # noqa: E402

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "integrations").glob("*/README.md")]
)
DIRECTIVE = re.compile(r"<!--\s*(test):?\s*(?P<body>.*?)\s*-->\s*$")
SUB = re.compile(r"sub (?P<old>.+?) -> (?P<new>.+)$")
RUN = re.compile(r"(?:cwd (?P<cwd>\S+))? ?(?P<run>run(?: (?P<args>.*))?)?$")



def _directives(example) -> List[Tuple[str, str]]:
    """The HTML-comment directives on the lines right above the block."""
    above = example.document.text[: example.start].rstrip("\n").splitlines()
    found = []
    for line in reversed(above):
        match = DIRECTIVE.match(line.strip())
        if not match:
            break
        found.append((match.group(1), match["body"]))
    return found


def _source(example) -> str:
    source = str(example.parsed)
    for kind, body in _directives(example):
        match = SUB.match(body) if kind == "test" else None
        if match:
            assert match["old"] in source, f"{example.path}:{example.line}: 'sub' text not in the block"
            source = source.replace(match["old"], match["new"])
    return source


def _needs_solo(example) -> bool:
    return any(kind == "test" and body == "needs solo-learn" for kind, body in _directives(example))


def evaluate_python(example) -> None:
    if _needs_solo(example):
        pytest.importorskip("solo", reason="needs solo-learn")
    source = "\n" * (example.line) + _source(example)  # line numbers as in the file
    exec(compile(source, str(example.path), "exec"), example.namespace)


# ------------------------------------------------------------------------------- shell
def _commands(source: str) -> List[List[str]]:
    text = re.sub(r"\\\n", " ", source)
    commands = []
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def _extras() -> Dict[str, object]:
    import tomllib  # Python >= 3.11; the doc tests need no older Python

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _check_pip(words: List[str]) -> None:
    extras = _extras()
    args = words[words.index("install") + 1:]
    for arg in args:
        if arg.startswith("-") or arg.startswith("http") or "://" in arg:
            continue
        match = re.fullmatch(r"(?:\.|\.?/?[\w./-]+?)\[(?P<extras>[\w,-]+)\]", arg)
        if match:
            missing = [e for e in match["extras"].split(",") if e not in extras]
            assert not missing, f"pip install names extras {missing} that pyproject.toml lacks ({sorted(extras)})"
    if "--index-url" in args:
        assert args[args.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"


def _run(argv: List[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", COLUMNS="100")
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _run_directive(example) -> Optional[Tuple[Optional[str], List[str]]]:
    for kind, body in _directives(example):
        match = RUN.match(body) if kind == "test" and body.startswith(("cwd", "run")) else None
        if match:
            return match["cwd"], (shlex.split(match["args"] or "") if match["run"] else None)
    return None


def evaluate_bash(example, tmp_path_factory=None) -> None:
    solo = _needs_solo(example)
    if solo:
        pytest.importorskip("solo", reason="needs solo-learn")
        if not os.environ.get("SOLO_LEARN_ROOT"):
            pytest.skip("needs a solo-learn checkout: set SOLO_LEARN_ROOT")
    directive = _run_directive(example)
    cwd_name, run_args = directive if directive else (None, None)
    run = (cwd_name, run_args) if run_args is not None else None
    ran = False
    for words in _commands(_source(example)):
        if words[:3] == ["python", "-m", "pip"]:
            words = words[2:]
        head = words[0]
        if head in ("pip",) and "install" in words:
            _check_pip(words)
        elif head == "directpred-bench":
            from _directpred_bench import build_parser

            build_parser().parse_args(words[1:])  # SystemExit on an unknown option or value
            if run is not None:
                out = Path(example.namespace.setdefault("_tmp", _tmpdir()))
                extra = ["--out", str(out / f"run{example.line}")] if words[1] in ("compare", "speed", "theory") else []
                if words[1] == "compare":
                    extra.append("--no-progress")
                _run([sys.executable, "-m", "_directpred_bench", *words[1:], *run[1], *extra], out)
                ran = True
        elif head == "python" and words[1:3] == ["-m", "pytest"]:
            options_with_values = ("-m", "-k", "-p")
            for previous, arg in zip(words[2:], words[3:]):
                if previous == "-m":  # a marker expression: its markers must be registered
                    markers = {word for word in arg.replace("(", " ").replace(")", " ").split()
                               if word not in ("not", "and", "or")}
                    registered = (ROOT / "pyproject.toml").read_text()
                    assert all(f'"{m}:' in registered for m in markers), f"python -m pytest -m {arg!r}: unknown marker"
                elif not arg.startswith("-") and previous not in options_with_values:
                    assert (ROOT / arg.split("::")[0]).exists(), f"python -m pytest names {arg}, which does not exist"
        elif head == "python" and words[1:3] == ["-m", "mkdocs"]:
            assert words[3] in ("serve", "build") and (ROOT / "mkdocs.yml").is_file()
        elif head == "python" and words[1:3] == ["-m", "directpred_plugin.solo"]:
            assert solo, "the launcher needs solo-learn: mark the block <!-- test: needs solo-learn -->"
        elif head == "python" and words[1] == "-c":
            compile(words[2], "<python -c>", "exec")
        elif head == "python" and words[1].endswith(".py"):
            if solo:
                continue  # solo-learn's main_pretrain.py, in its checkout
            cwd = ROOT / (cwd_name or ".")
            assert (cwd / words[1]).is_file(), f"python {words[1]}: no such script in {cwd}"
            if run is not None and not ran:
                _run([sys.executable, *words[1:], *run[1]], cwd)
                ran = True
        elif head == "python" and words[1:3] == ["-m", "venv"] and len(words) == 4:
            continue  # a fresh environment: nothing of this repository to check
        elif head in (".", "source") and words[1:] and words[1].endswith("/bin/activate"):
            continue
        elif head == "bash" and words[1:] == [".ci/run"]:
            assert (ROOT / ".ci/run").is_file()
        elif head in ("git", "cd", "cp", "sudo") and solo or head == "sudo" and "dataset-fashion-mnist" in words:
            continue  # setup steps outside this repository
        else:
            raise AssertionError(f"{example.path}:{example.line}: no test rule for the command {shlex.join(words)!r}")
    if run is not None:
        assert ran, f"{example.path}:{example.line}: <!-- test: run --> but no command of the block ran"


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="docs-examples-")


@pytest.fixture(autouse=True, scope="module")
def _benchmark_tables_as_shipped():
    """A page may add entries to the benchmarks' name tables (benchmarks.md's extension recipe
    does); they are removed after this module, so that later tests see the shipped tables."""
    from directpred_plugin.benchmarks import backbones, data, frameworks, predictors

    tables = [data.DATASETS, predictors.PREDICTOR_SPECS, backbones.BACKBONES,
              *(framework.methods for framework in frameworks.FRAMEWORKS.values())]
    shipped = [dict(table) for table in tables]
    yield
    for table, entries in zip(tables, shipped):
        table.clear()
        table.update(entries)


SYBIL = Sybil(
    parsers=[CodeBlockParser(language="python", evaluator=evaluate_python),
             CodeBlockParser(language="bash", evaluator=evaluate_bash)],
    path=str(ROOT),
)


def _examples():
    for path in DOCUMENTS:
        document = SYBIL.parse(path)
        for example in document:
            yield pytest.param(example, id=f"{path.relative_to(ROOT)}:{example.line}",
                               marks=[])


EXAMPLES = list(_examples())


def test_the_pages_have_code_blocks():
    names = {str(p.values[0].path) for p in EXAMPLES}
    assert str(ROOT / "README.md") in names and str(ROOT / "docs" / "head.md") in names
    assert len(EXAMPLES) >= 30


@pytest.mark.timeout(900)
@pytest.mark.parametrize("example", EXAMPLES)
def test_code_block(example):
    example.evaluate()


def test_a_renamed_option_fails_its_block(tmp_path):
    """The mechanism itself: a page whose example uses an option the head does not have fails."""
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        ```python
        from directpred_plugin import DirectPredHead
        DirectPredHead(8, frequency=2)
        ```

        ```bash
        directpred-bench compare --frequency 2
        ```
        """))
    python, shell = list(SYBIL.parse(page))
    with pytest.raises(TypeError, match="frequency"):
        python.evaluate()
    with pytest.raises(SystemExit):
        shell.evaluate()
