"""ldm's cache folder and its small JSON files: what is slow to find out and does not change often
(file hashes, the CPU's fastest kernels). Losing a cache only costs the time to find it out again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ldm.io import atomic_write


def cache_folder() -> Path:
    """``$LDM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ldm``, else ``~/.cache/ldm``."""
    if os.environ.get("LDM_CACHE_DIR"):
        return Path(os.environ["LDM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"


def read_entries(file: Path) -> dict:
    """The cache file's entries; an unreadable or damaged cache counts as empty (it only saves time)."""
    try:
        values = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def write_entries(file: Path, entries: dict) -> None:
    """Replace the cache file atomically; a read-only cache folder costs the work again next time, nothing else."""
    try:
        atomic_write(file, lambda tmp: tmp.write_text(json.dumps(entries, indent=1, sort_keys=True)), overwrite=True)
    except OSError:
        pass
