"""Everything but one build step is in pyproject.toml: this adds the solo-learn start-up hook.

The hook is a ``.pth`` file at the top of site-packages (Python runs a .pth line that starts
with ``import`` at start-up; see ``_directpred_solo_autoregister.py``). setuptools has no
declarative way to put a file there, so ``build_py`` writes it:

- for a wheel (``pip wheel .``, ``pip install .``) into the build folder, whose top level
  becomes the wheel's (and so site-packages');
- for an editable install (``pip install -e .``, PEP 660) into the editable wheel, which
  setuptools otherwise fills only with its own path hook.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK_PTH = "directpred_plugin_solo.pth"
# One line; sorts after setuptools' "__editable__.*.pth", so in an editable install the
# module is already importable when this line runs.
HOOK_LINE = "import _directpred_solo_autoregister; _directpred_solo_autoregister.install()\n"


class BuildPyWithStartupHook(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self._hook_dir(), HOOK_PTH)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(HOOK_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib, HOOK_PTH)))
        return outputs

    def _hook_dir(self) -> str:
        if self.editable_mode:
            # editable_wheel points install_lib at the unpacked editable wheel
            return self.get_finalized_command("install").install_lib
        return self.build_lib


setup(cmdclass={"build_py": BuildPyWithStartupHook})
