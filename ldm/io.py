"""Writing files without ever losing one: atomic writes and fresh names.

Outputs and checkpoints are written to a temporary file in the destination
folder, flushed, then renamed into place, so a killed process leaves either the
old state or the new one, never half a file. Nothing existing is overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically.

    ``write`` receives a path in the same folder (so the rename stays on one
    file system). Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp_path, path)
        else:
            # os.link fails if path appeared meanwhile: no silent overwrite even under a race.
            os.link(tmp_path, path)
            tmp_path.unlink()
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling, then rename it to ``path``.

    ``path`` must not exist yet; a half-written folder is never left under it.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp creates 0700
        os.rename(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path)
    return path


def next_free_path(folder: str | os.PathLike, stem: str, suffix: str, digits: int = 5) -> Path:
    """The first ``folder/NNNNN-stem.suffix`` whose number is above every number already used."""
    folder = Path(folder)
    highest = -1
    if folder.is_dir():
        for entry in folder.iterdir():
            head = entry.name.split("-", 1)[0]
            if head.isdigit():
                highest = max(highest, int(head))
    return folder / f"{highest + 1:0{digits}d}-{stem}{suffix}"
