"""Classifier-free guidance as a denoiser wrapper.

The denoising loop calls one ``denoiser(x, t)``; this module makes it from a network
``f(x, t, text_states)`` and the encoded prompts. With guidance, one network call runs the
unconditional and the conditional pass together (the U-Net repeats the one latent row where it
meets the two text rows) and mixes them (Ho & Salimans 2022, eq. 6):

    out = out_uncond + scale * (out_cond - out_uncond)

optionally rescaled toward the conditional output's per-sample std (Lin et al. 2024, sec. 3.4), and
only in the first ``guided_steps`` steps (guidance truncation: later steps change fine detail, which
the conditional pass alone renders nearly as well at half the cost). Scale, rescale and the window
are held together, as diffusers' ``ClassifierFreeGuidance`` guider holds them.

A guidance-distilled U-Net (LCM, Luo et al. 2023) was trained to give the guided output in one pass:
the scale enters as an embedding added to its time embedding (``EmbeddedGuidance``), and no
unconditional pass runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Network = Callable[..., torch.Tensor]  # (x, t, text states, timestep_cond=None) -> output
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> output


def guided_steps(fraction: float, steps: int) -> int:
    """The steps guidance runs in: the first ceil(fraction * steps)."""
    return math.ceil(fraction * steps)


class Conditional:
    """The conditional pass alone: guidance off (a scale of 1 or less)."""

    def __init__(self, network: Network, cond: torch.Tensor):
        self.network = network
        self.cond = cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, self.cond)


class ClassifierFreeGuidance:
    """Guided output for the first ``guided_steps`` calls, the conditional pass alone after.

    Counts its calls (one per denoising step), so it is made afresh for each generation.
    """

    def __init__(
        self, network: Network, cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float, guided_steps: int
    ):
        self.network = network
        self.cond = cond
        self.both = torch.cat([uncond, cond])  # diffusers' batch order: unconditional rows first
        self.scale = scale
        self.rescale = rescale
        self.guided_steps = guided_steps
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guided = self.calls < self.guided_steps
        self.calls += 1
        if not guided:
            return self.network(x, t, self.cond)
        out_uncond, out_cond = self.network(x, t, self.both).chunk(2)
        output = out_uncond + self.scale * (out_cond - out_uncond)
        return rescale_guidance(output, out_cond, self.rescale) if self.rescale > 0 else output


class EmbeddedGuidance:
    """One pass per step of a guidance-distilled network, the scale given as its ``timestep_cond``.

    LCM (Luo et al. 2023, sec. 4.2, "guided distillation") trains the network on the guided target
    for a scale w drawn per sample, fed as an embedding of w; diffusers' LCM pipeline writes the scale
    in Imagen's convention (``scale``, 1 = unguided) and embeds w = scale - 1, as this does.
    """

    def __init__(self, network: Network, cond: torch.Tensor, scale: float, embedding_dim: int):
        self.network = network
        self.cond = cond
        w = torch.full((1,), scale - 1.0, device=cond.device)
        self.w_embedding = guidance_scale_embedding(w, embedding_dim).to(cond.dtype)  # (1, dim): every row's

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, self.cond, timestep_cond=self.w_embedding)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The (N, dim) Fourier embedding of N guidance weights that LCM's U-Nets take (Luo et al. 2023).

    VDM's embedding (Kingma et al. 2021, appendix A.1, of 1000 w): sines then cosines at frequencies
    10000^(-i / (half - 1)), i < half = dim // 2, with one zero column appended when dim is odd.
    """
    half = dim // 2
    # The step in fp32 arithmetic, as diffusers computes it: a step rounded from float64 moves the
    # angles (up to ~1e4 rad) by 1e-4, which the U-Net's output shows.
    step = torch.log(torch.tensor(10000.0, device=w.device)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step)
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2))


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2024 ("Common Diffusion Noise Schedules ... are Flawed"), Sec. 3.4, eqs. 15-16.

    Rescale the guided prediction to the per-sample std of the conditional one,
    then mix ``phi`` of it with ``1 - phi`` of the plain guided prediction.
    """
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided
