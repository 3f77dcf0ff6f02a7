"""Model file hashes as AUTOMATIC1111 writes them, so images name the file the sharing sites know.

A1111's "Model hash" (its "AutoV2" short hash) is the first 10 hex digits of the file's SHA-256.
Hashing a 2-4 GB checkpoint takes seconds, so each file's hash is kept in a cache keyed by the
file's path, size and modification time (``hashes.json`` in ``cache_folder()``), as A1111 keeps
its ``cache.json``: a file is hashed again only when it changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ldm.cache import cache_folder, read_entries, write_entries

SHORT_HASH_DIGITS = 10


def sha256(path: Path, cache: Path | None = None) -> str:
    """The SHA-256 of the file at ``path`` in hex, from ``cache`` (default ``cache_folder()``) when it is there."""
    path = Path(path).resolve()
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    file = (cache or cache_folder()) / "hashes.json"
    known = read_entries(file)
    entry = known.get(str(path))
    if isinstance(entry, dict) and {k: entry.get(k) for k in key} == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    write_entries(file, {**known, str(path): {**key, "sha256": digest}})
    return digest


def short_hash(path: Path, cache: Path | None = None) -> str:
    """A1111's short hash of the file at ``path``."""
    return sha256(path, cache)[:SHORT_HASH_DIGITS]
