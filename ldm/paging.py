"""Hand an idle network's memory-mapped weights back to the page cache (Linux).

Weights read from safetensors (or a zip ``.ckpt``) in their own dtype are copy-on-write views of
a private file mapping (``ldm/loading/sources.py``): their pages become part of the process's
resident memory when the network first runs, and stay there while the pipeline is idle or runs
its other networks. ``madvise(MADV_DONTNEED)`` on those address ranges unmaps the pages: the
process's resident memory drops by their size, the bytes stay in the kernel's page cache (where
they can be reclaimed under memory pressure, as clean file pages), and the next access maps them
again with minor faults, or reads them from the file if the kernel dropped them meanwhile.

On a private mapping, ``MADV_DONTNEED`` would also throw away pages the process has written (an
in-place update copies a page out of the file: a fused LoRA, training, a user's edit), and the
next read would see the file's bytes again. So only a tensor that lies in a file-backed mapping
(``/proc/self/maps``) is handed back, and of its pages only those that are not an anonymous copy,
resident or swapped out (``/proc/self/pagemap``, bits 63, 62 and 61; Linux's
Documentation/admin-guide/mm/pagemap.rst).
Anything else (tensors in the process's own memory, on a GPU, on another system) is left alone.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from bisect import bisect_right
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

PAGE = mmap.PAGESIZE
PRESENT, SWAPPED, FILE_OR_SHARED = 1 << 63, 1 << 62, 1 << 61


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every file-backed mapping of this process, sorted."""
    spans = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            inode, path = int(fields[4]), fields[5].strip() if len(fields) > 5 else ""
            if inode and path.startswith("/"):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                spans.append((start, end))
    return sorted(spans)


def _page_span(tensor: torch.Tensor) -> tuple[int, int]:
    """Page-aligned (first page, end page) address range of a contiguous tensor's data."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return start // PAGE * PAGE, -(-end // PAGE) * PAGE


def _entries(pagemap, start: int, end: int) -> np.ndarray:
    """The 64-bit pagemap entry of every page in the page-aligned range [start, end)."""
    pagemap.seek(start // PAGE * 8)
    return np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)


def _file_page_runs(pagemap, start: int, end: int) -> list[tuple[int, int]]:
    """(start, end) runs of the pages in [start, end) that are not anonymous copies, resident or swapped out."""
    entries = _entries(pagemap, start, end)
    anonymous = ((entries & np.uint64(PRESENT)) != 0) & ((entries & np.uint64(FILE_OR_SHARED)) == 0)
    keep = anonymous | ((entries & np.uint64(SWAPPED)) != 0)
    edges = np.flatnonzero(np.diff(np.concatenate(([True], keep, [True])).astype(np.int8)))  # run starts, ends
    return [(start + int(a) * PAGE, start + int(b) * PAGE) for a, b in zip(edges[::2], edges[1::2])]


def release_to_page_cache(module: nn.Module) -> int:
    """Unmap the resident pages of ``module``'s file-mapped, unmodified weights; the bytes of address
    range handed back (0 where nothing qualifies or off Linux). The weights stay usable as they are."""
    return release_tensors((*module.parameters(), *module.buffers()))


def convert(module: nn.Module, **changes) -> nn.Module:
    """``module.to(**changes)`` (a device, dtype or memory format), then the file pages of the weights it replaced
    handed back to the page cache.

    A conversion reads each weight it replaces, so a memory-mapped weight's pages become resident. Nothing refers
    to the old weight afterwards, but its pages stay mapped, and counted in the process's resident memory, as
    long as the file's mapping lives (the network's other weights view it): a second copy of each converted
    weight (e.g. a network's convolution weights turned channels-last where bf16 measured faster so).
    """
    # Only file-backed weights are held through the conversion (free: the file's mapping lives anyway); holding a
    # weight in the process's own memory would keep every old copy alive until the last new one is made.
    old = file_backed([tensor.detach() for tensor in (*module.parameters(), *module.buffers())])
    module.to(**changes)
    kept = {tensor.data_ptr() for tensor in (*module.parameters(), *module.buffers())}
    release_tensors(tensor for tensor in old if tensor.data_ptr() not in kept)
    return module


def file_backed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors that lie wholly in a file mapping (CPU, contiguous; none off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    mappings = _file_mappings()
    starts = [start for start, _ in mappings]
    found = []
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or not tensor.numel():
            continue
        start, end = _page_span(tensor)
        i = bisect_right(starts, start) - 1
        if i >= 0 and end <= mappings[i][1]:
            found.append(tensor)
    return found


def release_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """``release_to_page_cache`` of these tensors: their resident pages that are file pages the process never wrote."""
    spans = {_page_span(t) for t in file_backed(list(tensors))}  # the process's own memory is left alone
    if not spans:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for start, end in sorted(spans):
            for a, b in _file_page_runs(pagemap, start, end):
                if libc.madvise(a, b - a, mmap.MADV_DONTNEED) == 0:
                    released += b - a
    return released


def resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s pages that are mapped into this process now (for tests and diagnostics)."""
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = _entries(pagemap, *_page_span(tensor))
    return int(((entries & np.uint64(PRESENT)) != 0).sum()) * PAGE
