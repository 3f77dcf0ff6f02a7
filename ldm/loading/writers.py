"""Writing weight files whose bytes depend only on their content.

Converting the same model twice must give the same file, so that a checksum identifies a
model. Two writers of the libraries do not give that:

- safetensors' ``save_file`` keeps the ``__metadata__`` in a Rust hash map, whose order
  changes from process to process;
- ``torch.save(obj, path)`` names the zip archive's folder after the file name, and ldm
  writes through a temporary name that differs every time.

``write_safetensors`` writes the format itself (https://github.com/huggingface/safetensors,
"Format"): an 8-byte little-endian header length, a JSON header padded with spaces, then the
tensors' bytes back to back. Metadata keys are sorted. The data starts 64-byte aligned, and
tensors are ordered so that it stays so for most of them: first those whose byte size is a
multiple of 64 (every large weight), then the others by element size, largest first (which
keeps each aligned to its element size, as the format requires), each group by name. ``write_ckpt`` hands ``torch.save`` an open file, so
the archive is always named ``archive``, and sorts the keys of the state dict and metadata.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ldm.loading.sources import SAFETENSORS_DTYPES

# The safetensors names of the dtypes ldm writes.
_DTYPES = SAFETENSORS_DTYPES


# Where the tensors' bytes start, and what each tensor's start should be a multiple of: oneDNN's
# kernels take other code paths (and give results that differ in the last bits) for weights
# that are not 64-byte aligned, as memory from torch's allocator always is.
_ALIGNMENT = 64


def tensor_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors whose byte size keeps the next one aligned first, then by element size, largest first."""

    def rank(key: str) -> tuple[bool, int, str]:
        tensor = tensors[key]
        return tensor.numel() * tensor.element_size() % _ALIGNMENT != 0, -tensor.element_size(), key

    return sorted(tensors, key=rank)


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The length-prefixed, space-padded JSON header of a safetensors file holding ``tensors``."""
    header: dict[str, object] = {"__metadata__": {key: metadata[key] for key in sorted(metadata)}} if metadata else {}
    offset = 0
    for key in tensor_order(tensors):
        tensor = tensors[key]
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % _ALIGNMENT)  # the data starts _ALIGNMENT-aligned (8 | 64: still 8-aligned)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write CPU ``tensors`` and string ``metadata`` to ``path`` as a reproducible safetensors file."""
    write_safetensors_streamed(path, tensors, tensors.__getitem__, metadata)


def write_safetensors_streamed(
    path: Path, specs: Mapping[str, torch.Tensor], produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file whose tensors are made one at a time by ``produce(key)``.

    ``specs`` give each tensor's shape and dtype (meta tensors will do), so the header is written
    first and at most one produced tensor is held at a time (``ldm merge`` streams this way).
    """
    for key, tensor in specs.items():
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {key} has dtype {tensor.dtype}, which ldm does not write")
    with open(path, "wb") as file:
        file.write(safetensors_header(specs, metadata))
        for key in tensor_order(specs):
            file.write(tensor_bytes(produce(key), specs[key], key))


def tensor_bytes(tensor: torch.Tensor, spec: torch.Tensor, key: str) -> memoryview:
    """The raw bytes of CPU ``tensor``, in the machine's order (little-endian on every platform torch ships
    for), after checking that it is what the header promised."""
    if tensor.dtype != spec.dtype or tensor.shape != spec.shape:
        raise ValueError(f"tensor {key} is {tensor.dtype} {tuple(tensor.shape)}, not {spec.dtype} {tuple(spec.shape)} as declared")
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data


def write_ckpt(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``{"state_dict": state}`` (and ``"metadata"`` if any) with ``torch.save``: keys sorted,
    archive named ``archive``."""
    content: dict[str, object] = {"state_dict": {key: state[key] for key in sorted(state)}}
    if metadata:
        content["metadata"] = {key: metadata[key] for key in sorted(metadata)}
    with open(path, "wb") as file:
        torch.save(content, file)
