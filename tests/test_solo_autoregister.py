"""The start-up hook that registers DirectPred with solo-learn (``_directpred_solo_autoregister``).

Each behaviour is checked in a fresh interpreter, where the installed ``.pth`` line ran at
start-up; none of these interpreters imports ``directpred_plugin`` explicitly. The tests that
import solo-learn skip when it is not installed; the others run everywhere, as CI does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _directpred_solo_autoregister as hook

SOLO_MISSING = "solo-learn not installed: install it from source, see integrations/solo_learn/README.md"
HAS_SOLO = importlib.util.find_spec("solo") is not None


def fresh_python(code: str, *, opt_out: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != hook.OPT_OUT_ENV}
    if opt_out is not None:
        env[hook.OPT_OUT_ENV] = opt_out
    # Not the repository folder: its files must come from the installed package only.
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(sys.executable).parent,
                          capture_output=True, text=True, timeout=timeout)


STARTUP_STATE = """
import json, sys
print(json.dumps({
    "finders": [type(f).__name__ for f in sys.meta_path].count("SoloMethodsFinder"),
    "heavy": sorted(m for m in ("torch", "solo", "directpred_plugin") if m in sys.modules),
    "hook_loaded": "_directpred_solo_autoregister" in sys.modules,
}))
"""


def test_installed_hook_loads_at_start_up_and_imports_nothing_heavy():
    result = fresh_python(STARTUP_STATE)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["hook_loaded"], "the .pth was not installed: reinstall with pip install -e ."
    assert state["finders"] == 1
    assert state["heavy"] == []
    assert result.stderr == ""


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_environment_variable_turns_the_hook_off(value):
    assert not hook.enabled({hook.OPT_OUT_ENV: value})
    state = json.loads(fresh_python(STARTUP_STATE, opt_out=value).stdout)
    assert state["finders"] == 0


def test_hook_is_on_by_default():
    assert hook.enabled({}) and hook.enabled({hook.OPT_OUT_ENV: "1"})


def test_finder_answers_only_for_solo_methods_and_only_when_it_exists(monkeypatch):
    finder = hook.SoloMethodsFinder()
    assert finder.find_spec("json") is None
    monkeypatch.setattr(sys, "meta_path", [finder])  # no finder behind it can find solo.methods
    assert finder.find_spec(hook.TRIGGER_MODULE) is None


def test_hook_is_inert_when_solo_learn_is_absent():
    # Where solo-learn is installed, a finder in front makes it absent for this interpreter.
    code = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "solo":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
try:
    import solo.methods
except ModuleNotFoundError as err:
    print("absent:", err.name)
import directpred_plugin.solo
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] == "solo"))
"""
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["absent: solo", "loaded: []"]
    assert result.stderr == ""


def test_failed_registration_fails_the_import_and_names_the_opt_out(monkeypatch):
    import directpred_plugin.solo as adapter

    def broken_register():
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter, "register", broken_register)
    with pytest.raises(ImportError, match=rf"could not register DirectPred.*RuntimeError: boom.*{hook.OPT_OUT_ENV}=0"):
        hook._register()


# ------------------------------------------------------------------- with solo-learn
REGISTRY = """
import json, sys
from solo.methods import METHODS
import solo.methods
print(json.dumps({
    "byol": METHODS["byol"].__module__, "simsiam": METHODS["simsiam"].__module__,
    "vicreg": METHODS["vicreg"].__module__,
    "original_byol": METHODS["byol"] is solo.methods.BYOL,
    "loader": type(solo.methods.__loader__).__name__,
}))
"""


@pytest.mark.skipif(not HAS_SOLO, reason=SOLO_MISSING)
@pytest.mark.timeout(240)
def test_importing_solo_methods_registers_directpred():
    result = fresh_python(REGISTRY, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    registry = json.loads(result.stdout)
    assert registry["byol"] == registry["simsiam"] == registry["vicreg"] == "directpred_plugin.solo"
    assert not registry["original_byol"]
    assert registry["loader"] == "_RegisteringLoader"


@pytest.mark.skipif(not HAS_SOLO, reason=SOLO_MISSING)
@pytest.mark.timeout(240)
def test_opted_out_solo_learn_keeps_its_own_methods():
    result = fresh_python(REGISTRY, opt_out="0", timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    registry = json.loads(result.stdout)
    assert registry["byol"] == "solo.methods.byol" and registry["original_byol"]
    assert registry["loader"] != "_RegisteringLoader"
