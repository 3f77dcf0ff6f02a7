"""Model file hashes as AUTOMATIC1111 writes them, so images name the file the sharing sites know.

A1111's "Model hash" (its "AutoV2" short hash) is the first 10 hex digits of the file's SHA-256; its
"Lora hashes" take 12 digits of a ``.safetensors`` LoRA's tensor bytes (``tensors_sha256``; see
``ldm.adapters.folder``).
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
    return _cached(path, "sha256", _file_digest, cache)


def tensors_sha256(path: Path, cache: Path | None = None) -> str:
    """The SHA-256 of a ``.safetensors`` file's bytes after its header: kohya's and AUTOMATIC1111's LoRA
    hash (``addnet_hash_safetensors``; Civitai's "AutoV3"), which does not change when metadata does."""
    return _cached(path, "tensors_sha256", _tensors_digest, cache)


def short_hash(path: Path, cache: Path | None = None) -> str:
    """A1111's short hash of the file at ``path``."""
    return sha256(path, cache)[:SHORT_HASH_DIGITS]


def _cached(path: Path, kind: str, digest, cache: Path | None) -> str:
    """``digest(path)``, kept in the cache under ``kind`` beside the file's size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    file = (cache or cache_folder()) / "hashes.json"
    known = read_entries(file)
    entry = known.get(str(path))
    entry = entry if isinstance(entry, dict) and {k: entry.get(k) for k in key} == key else key
    if isinstance(entry.get(kind), str):
        return entry[kind]
    value = digest(path)
    write_entries(file, {**known, str(path): {**entry, kind: value}})
    return value


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _tensors_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")  # safetensors: an 8-byte length, then the JSON header
        handle.seek(8 + header)
        return hashlib.file_digest(handle, "sha256").hexdigest()
