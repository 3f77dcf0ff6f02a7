"""Build hook: the wheel carries the default model.

The repository keeps the model at ``weights/ldm-shapes`` (the layout users see). A wheel holds
only what lies under the package, so ``build_py`` copies it to ``ldm/weights/ldm-shapes`` in the
build, where ``ldm.loading.DEFAULT_MODEL_DIR`` looks first. Editable installs run from the
checkout and find ``weights/`` beside the package, so nothing is copied for them. Everything
else about the package is in ``pyproject.toml``; ``MANIFEST.in`` puts the model in the sdist.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DEFAULT_MODEL = Path("weights") / "ldm-shapes"


class BuildPyWithDefaultModel(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_tree(str(DEFAULT_MODEL), str(Path(self.build_lib) / "ldm" / DEFAULT_MODEL))


setup(cmdclass={"build_py": BuildPyWithDefaultModel})
