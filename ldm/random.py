"""Seeded noise that means the same thing on every device and batch size.

All random draws in ldm go through ``randn``: noise is drawn on the generator's
device (the CPU for seeds) and then moved, so a seed gives the same image on a
CPU and on a GPU. A list of generators draws one batch element from each, so
image i of a batch equals a single image made with generator i.
"""

from __future__ import annotations

import torch


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape``; see the module docstring for the rules."""
    dtype = dtype or torch.float32
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [randn((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(parts, dim=0)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device) if device is not None else noise


def seed_generators(seed: int, count: int) -> list[torch.Generator]:
    """CPU generators for seeds ``seed, seed+1, ..., seed+count-1``."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
