"""Model file hashes as AUTOMATIC1111 writes them, so images name the file the sharing sites know.

A1111's "Model hash" (its "AutoV2" short hash) is the first 10 hex digits of the file's SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SHORT_HASH_DIGITS = 10


def sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, in hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def short_hash(path: Path) -> str:
    """A1111's short hash of the file at ``path``."""
    return sha256(path)[:SHORT_HASH_DIGITS]
