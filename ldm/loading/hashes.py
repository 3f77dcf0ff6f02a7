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
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.cache import cache_folder, read_entries, write_entries
from ldm.loading.writers import safetensors_header, tensor_bytes, tensor_order

SHORT_HASH_DIGITS = 10
# A1111's old "model hash": 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB of the file.
LEGACY_OFFSET, LEGACY_SIZE, LEGACY_DIGITS = 0x100000, 0x10000, 8


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


def legacy_hash(path: Path) -> str:
    """A1111's old model hash of a file (``sd_models.model_hash``; kohya's ``ss_sd_model_hash``)."""
    with open(path, "rb") as handle:
        handle.seek(LEGACY_OFFSET)
        return hashlib.sha256(handle.read(LEGACY_SIZE)).hexdigest()[:LEGACY_DIGITS]


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of a safetensors file that ldm writes with ``tensors``, as kohya's
    ``precalculate_safetensors_hashes`` computes them before saving (sd-webui-additional-networks reads them
    instead of hashing the file):

    - the model hash is the SHA-256 of the bytes after the header, which metadata does not change, so it
      equals ``tensors_sha256`` of the written file;
    - the legacy hash is A1111's old hash (``legacy_hash``) of the file as it would be with only the
      ``ss_*`` training metadata, which kohya treats as immutable (so the value does not depend on itself).
    """
    model = hashlib.sha256()
    header = safetensors_header(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    window, position = bytearray(), 0
    for chunk in [header] + [tensor_bytes(tensors[key], tensors[key], key) for key in tensor_order(tensors)]:
        if chunk is not header:
            model.update(chunk)
        start, end = max(LEGACY_OFFSET - position, 0), min(LEGACY_OFFSET + LEGACY_SIZE - position, len(chunk))
        if start < end:
            window += bytes(chunk[start:end])
        position += len(chunk)
    return model.hexdigest(), hashlib.sha256(window).hexdigest()[:LEGACY_DIGITS]
