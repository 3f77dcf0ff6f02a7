"""Seeds, and seeded noise that means the same thing on every device and batch size.

A seed is an integer from 0 to ``MAX_SEED``; ``-1`` (``RANDOM_SEED``, the convention of A1111,
ComfyUI and stable-diffusion.cpp) or None asks for a random one, which ``resolve_seed`` draws and
the caller reports, so every image can be made again. The command line and ``Pipeline`` both go
through ``resolve_seed``: one range (``ldm.checks.check_seed``), one rule.

All random draws in ldm go through ``randn``: noise is drawn on the generator's
device (the CPU for seeds) and then moved, so a seed gives the same image on a
CPU and on a GPU. A list of generators draws one batch element from each, so
image i of a batch equals a single image made with generator i.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from ldm.checks import MAX_SEED, RANDOM_SEED, check_seed

if TYPE_CHECKING:
    import torch

RANDOM_SEEDS = 2**32  # drawn seeds are 32-bit, as A1111 and stable-diffusion.cpp draw them


def resolve_seed(seed: int | None, count: int, name: str = "seed") -> int:
    """The first of ``count`` consecutive seeds: ``seed`` checked, or a random one for None or -1.

    Imports no torch, so the command line checks ``--seed`` before loading anything.
    """
    if seed is None or check_seed(seed, count, name) == RANDOM_SEED:
        return secrets.randbelow(RANDOM_SEEDS)
    return seed


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape``; see the module docstring for the rules."""
    import torch

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
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) of one image's noise ``low`` (C, H, W) toward ``high`` by ``t``, as
    A1111 computes its variation seeds: each (channel, column) is one vector along the rows, interpolated on the
    great circle through both; where the two are nearly parallel on average (mean cosine > 0.9995) it mixes
    them linearly with A1111's weights, ``t`` on ``low``. ``t`` = 0 gives ``low`` and 1 gives ``high``
    elsewhere."""
    import torch

    low_unit = low / torch.linalg.vector_norm(low, dim=1, keepdim=True)
    high_unit = high / torch.linalg.vector_norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)  # (C, W)
    if cosine.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin_omega).unsqueeze(1) * low + (torch.sin(t * omega) / sin_omega).unsqueeze(1) * high

