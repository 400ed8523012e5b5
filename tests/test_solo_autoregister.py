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

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

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
def test_environment_variable_turns_the_registration_off(value):
    assert not hook.enabled({hook.OPT_OUT_ENV: value})
    # the finder stays: importing solo.methods then installs the guard instead
    state = json.loads(fresh_python(STARTUP_STATE, opt_out=value).stdout)
    assert state["finders"] == 1 and state["heavy"] == []


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
TESTS = Path(__file__).resolve().parent

#: In a fresh interpreter: what solo.methods holds, and what building a BYOL from its class
#: (as solo-learn's own tests do) gives for each predictor choice, before and after register().
BUILDS = f"""
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(TESTS)!r})
from test_solo import make_cfg
import solo.methods
from solo.methods import METHODS
from solo.methods.base import BaseMethod

def build(**kwargs):
    try:
        return type(solo.methods.BYOL(make_cfg("byol", **kwargs)).predictor).__name__
    except ValueError as err:
        return "ValueError: " + str(err)

state = {{
    "same_classes": METHODS["byol"] is solo.methods.BYOL,
    "init": solo.methods.BYOL.__init__.__module__,
    "check": BaseMethod.add_and_assert_specific_cfg.__module__,
    "loader": type(solo.methods.__loader__).__name__,
    "mlp": build(), "directpred": build(predictor="directpred"),
}}
import directpred_plugin.solo
directpred_plugin.solo.register()
state["after_register"] = build(predictor="directpred")
print(json.dumps(state))
"""


@pytest.mark.skipif(not HAS_SOLO, reason=SOLO_MISSING)
@pytest.mark.timeout(240)
def test_importing_solo_methods_registers_directpred_in_place():
    result = fresh_python(BUILDS, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout)
    assert state["same_classes"]  # nothing swapped: solo-learn's classes, patched
    assert state["init"] == state["check"] == "directpred_plugin.solo.registration"
    assert state["loader"] == "_RegisteringLoader"
    assert (state["mlp"], state["directpred"]) == ("Sequential", "DirectPredHead")


@pytest.mark.skipif(not HAS_SOLO, reason=SOLO_MISSING)
@pytest.mark.timeout(240)
def test_opted_out_solo_learn_refuses_a_directpred_predictor_until_registered():
    result = fresh_python(BUILDS, opt_out="0", timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout)
    assert state["same_classes"] and state["init"] == "solo.methods.byol"  # nothing patched but the guard
    assert state["check"] == "_directpred_solo_autoregister"
    assert state["mlp"] == "Sequential"  # solo-learn's own model, as without the plugin
    # not silently the MLP: refused, naming the variable and both fixes
    assert state["directpred"].startswith("ValueError: method_kwargs.predictor is 'directpred'")
    for part in (f"{hook.OPT_OUT_ENV}='0'", f"unset {hook.OPT_OUT_ENV}", "directpred_plugin.solo.register()",
                 "python -m directpred_plugin.solo"):
        assert part in state["directpred"]
    assert state["after_register"] == "DirectPredHead"


def test_guard_refuses_only_non_mlp_predictors_and_comes_off_again():
    OmegaConf = pytest.importorskip("omegaconf").OmegaConf  # solo-learn's config library

    class Base:
        @staticmethod
        def add_and_assert_specific_cfg(cfg):
            cfg.checked = True
            return cfg

    original = Base.__dict__["add_and_assert_specific_cfg"].__func__
    hook.install_guard(Base)
    hook.install_guard(Base)  # idempotent: one guard
    assert Base.add_and_assert_specific_cfg.__wrapped__ is original
    for predictor in (None, "mlp"):
        cfg = OmegaConf.create({"method_kwargs": {} if predictor is None else {"predictor": predictor}})
        assert Base.add_and_assert_specific_cfg(cfg).checked
    with pytest.raises(ValueError, match=r"method_kwargs.predictor is 'ns', but directpred-plugin is not registered"):
        Base.add_and_assert_specific_cfg(OmegaConf.create({"method_kwargs": {"predictor": "ns"}}))
    hook.remove_guard(Base)
    assert Base.__dict__["add_and_assert_specific_cfg"].__func__ is original
    hook.remove_guard(Base)  # nothing to remove: nothing happens
    assert Base.__dict__["add_and_assert_specific_cfg"].__func__ is original
