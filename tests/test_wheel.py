"""A non-editable install carries the default model and the server's web page: the wheel, installed
into a fresh virtual environment and run from another folder, makes its first image."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What a build reads (pyproject.toml's readme, the package, setup.py's default model).
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "ldm", "weights")


def _run(*argv, **options) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **options)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="builds without isolation, with this setuptools")
def test_installed_wheel_makes_an_image_with_its_default_model(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": ignore} if copy is shutil.copytree else {}))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source)
    (wheel,) = (tmp_path / "dist").glob("ldm-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    assert "ldm/weights/ldm-shapes/unet/diffusion_pytorch_model.safetensors" in files
    assert {f"ldm/server/static/{name}" for name in ("index.html", "page.js", "page.css")} <= set(files)  # ldm serve's page

    # A fresh environment that sees this one's torch, transformers... but not its ldm: a .pth line adds
    # a folder to sys.path without running that folder's own .pth files (an editable ldm's finder).
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: pip must not uninstall the ldm it sees through the .pth line.
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    _run(venv / "bin" / "ldm", "txt2img", "a red circle", "--steps", "2", "--quiet", cwd=elsewhere, env=env)
    (image,) = (elsewhere / "outputs").glob("*.png")
    assert image.read_bytes().startswith(b"\x89PNG")
    where = _run(python, "-c", "import ldm.loading as l; print(l.DEFAULT_MODEL_DIR)", cwd=elsewhere, env=env).stdout
    assert Path(where.strip()).is_relative_to(site)
    page = _run(python, "-c", "from ldm.server.app import STATIC; print(STATIC / 'index.html')", cwd=elsewhere, env=env).stdout
    assert Path(page.strip()).is_relative_to(site) and Path(page.strip()).is_file()
