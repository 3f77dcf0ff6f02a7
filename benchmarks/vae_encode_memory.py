"""Peak resident memory of one SD-VAE encode (random weights, SD 1.x shape) of a size x size image.

    python benchmarks/vae_encode_memory.py plain|strips|tiled [SIZE]   (one mode per process: a fresh high-water mark)

plain: layer by layer (autograd on, nothing requires a gradient: no graph is kept); strips: inference, the
encoder's strip-wise down path (ldm.models.vae_strips, exact); tiled: ``encode_tiled`` (64-latent tiles, blended).
"""

from __future__ import annotations

import sys
import time

import torch

from ldm.models import AutoencoderKL, VAEConfig


def high_water_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def main(mode: str, size: int) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.sd()).eval().requires_grad_(False)
    x = torch.rand(1, 3, size, size) * 2 - 1
    before, start = high_water_mib(), time.perf_counter()
    if mode == "plain":
        with torch.enable_grad():
            vae.encode(x)
    else:
        with torch.inference_mode():
            (vae.encode if mode == "strips" else vae.encode_tiled)(x)
    print(f"{mode} {size}: peak {high_water_mib():.0f} MiB (before the encode {before:.0f} MiB), {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1024)
