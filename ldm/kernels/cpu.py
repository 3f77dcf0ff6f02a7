"""The CPU at hand: its model name, the vector and matrix extensions that decide which kernels are fast,
and whether it computes bf16 natively.

Read from ``/proc/cpuinfo`` (Linux); elsewhere the model is ``platform.processor()`` and no flag is known.
"""

from __future__ import annotations

import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# The extensions that decide the fp32 and bf16 kernels: AVX2 / FMA, AVX-512 and its BF16 instructions,
# Intel's AMX tiles; on Arm, the BF16 dot products (the "bf16" feature).
KERNEL_FLAGS = re.compile(r"^(avx512\w*|amx\w*|avx_vnni|avx2|fma|bf16|sve\w*|asimd\w*)$")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class CPU:
    model: str
    flags: tuple[str, ...]  # the KERNEL_FLAGS it has, sorted

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 products run in hardware (AVX512_BF16, AMX, Arm BF16) rather than emulated in fp32."""
        return bool(NATIVE_BF16_FLAGS.intersection(self.flags))

    @property
    def key(self) -> str:
        """What a measured kernel choice depends on: the model and its flags (a VM may hide some)."""
        return f"{self.model} [{' '.join(self.flags)}]"


def this_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CPU:
    """The CPU this process runs on."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return CPU(platform.processor() or platform.machine() or "unknown CPU", ())
    model = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    found = sorted({flag for flag in (flags.group(1).split() if flags else []) if KERNEL_FLAGS.match(flag)})
    return CPU(model.group(1).strip() if model else platform.machine() or "unknown CPU", tuple(found))


def bf16_slowdown(size: int = 512, repeats: int = 5) -> float:
    """How many times longer a ``size``-cubed matrix product takes in bf16 than in fp32 here (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - start)
        times[dtype] = best
    return times[torch.bfloat16] / times[torch.float32]
