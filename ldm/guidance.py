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

The text states may change from step to step (A1111's prompt editing and alternation,
``ldm.prompt_schedule``): a ``Conditioning`` holds each encoded text once and, for each step, the rows
the network reads. A prompt of several sub-prompts (``a AND b :1.2``, composable diffusion, Liu et
al. 2022) runs the unconditional pass and every sub-prompt in the same network call and adds up their
guidance, as A1111's ``combine_denoised`` does:

    out = out_uncond + sum_j w_j * scale * (out_cond_j - out_uncond)

SDXL's U-Net also reads a pooled text embedding per text row and the micro-conditioning numbers
(Podell et al. 2023, sec. 2.2); a ``Conditioning`` may carry them (``pooled``, ``time_ids``), and every
wrapper hands the network the rows' own as ``**conditions`` (``text_embeds``, ``time_ids``), so the
unconditional rows get the negative prompt's pooled embedding and numbers.

A guidance-distilled U-Net (LCM, Luo et al. 2023) was trained to give the guided output in one pass:
the scale enters as an embedding added to its time embedding (``EmbeddedGuidance``), and no
unconditional pass runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

Network = Callable[..., torch.Tensor]  # (x, t, text states, timestep_cond=None) -> output
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> output


def guided_steps(fraction: float, steps: int) -> int:
    """The steps guidance runs in: the first ceil(fraction * steps)."""
    return math.ceil(fraction * steps)


@dataclass(frozen=True)
class Conditioning:
    """The text states the network reads at each denoising step (counted from 0).

    ``states`` (N, L, D) holds each encoded text once. At step i the conditional rows are
    ``states[cond[i]]``: sub-prompt j of image b at row j * B + b (k sub-prompts, B images); the
    unconditional ones are ``states[uncond[i]]``. ``weights[j][b]`` is sub-prompt j's weight in image b,
    None for one sub-prompt of weight 1 per image (a plain prompt: guidance exactly as without).
    A run longer than the rows keeps reading the last.
    """

    states: torch.Tensor
    cond: torch.Tensor  # (steps, k * B) int64
    uncond: torch.Tensor | None = None  # (steps, B) int64; None: no unconditional pass
    weights: tuple[tuple[float, ...], ...] | None = None  # k tuples of B weights
    pooled: torch.Tensor | None = None  # (N, P): each text's pooled embedding, rows as ``states`` (SDXL's text_embeds)
    time_ids: torch.Tensor | None = None  # (2, n): the conditional rows' micro-conditioning numbers, then the unconditional's

    def from_step(self, first: int) -> Conditioning:
        """The rows from step ``first`` on: a run that continues a schedule partway (an SDXL refiner after the
        base) reads on where the schedule is, as A1111's one sampling loop does across the switch."""
        if first == 0:
            return self
        first = min(first, len(self.cond) - 1)
        return replace(self, cond=self.cond[first:], uncond=None if self.uncond is None else self.uncond[first:])

    @classmethod
    def fixed(cls, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> Conditioning:
        """The same text states at every step: ``cond`` (B, L, D) and ``uncond`` (B, L, D) or None."""
        states = cond if uncond is None else torch.cat([cond, uncond])
        rows = torch.arange(len(states), device=cond.device)[None]
        return cls(states, rows[:, : len(cond)], None if uncond is None else rows[:, len(cond) :])

    @property
    def parts(self) -> int:
        """k: the sub-prompts of each image."""
        return 1 if self.weights is None else len(self.weights)

    @property
    def scheduled(self) -> bool:
        """Whether the texts change between steps (prompt editing or alternation)."""
        rows = self.cond if self.uncond is None else torch.cat([self.cond, self.uncond], dim=1)
        return bool((rows != rows[:1]).any())

    def cond_at(self, step: int) -> torch.Tensor:
        return self.states[self.cond[min(step, len(self.cond) - 1)]]

    def both_at(self, step: int) -> torch.Tensor:
        """The unconditional rows, then the conditional ones (diffusers' batch order)."""
        step = min(step, len(self.cond) - 1)
        return self.states[torch.cat([self.uncond[step], self.cond[step]])]

    def cond_conditions(self, step: int) -> dict[str, torch.Tensor]:
        """The network's added inputs for ``cond_at(step)``'s rows (none without a pooled embedding)."""
        return self._conditions(self.cond[min(step, len(self.cond) - 1)], 0)

    def both_conditions(self, step: int) -> dict[str, torch.Tensor]:
        """The network's added inputs for ``both_at(step)``'s rows: the unconditional rows' own, then the conditional."""
        step = min(step, len(self.cond) - 1)
        return self._conditions(torch.cat([self.uncond[step], self.cond[step]]), len(self.uncond[step]))

    def _conditions(self, rows: torch.Tensor, unconditional: int) -> dict[str, torch.Tensor]:
        if self.pooled is None:
            return {}
        numbers = self.time_ids[[1] * unconditional + [0] * (len(rows) - unconditional)]
        return {"text_embeds": self.pooled[rows], "time_ids": numbers}


class Conditional:
    """The conditional pass alone: guidance off (a scale of 1 or less). Counts its calls (one per step)."""

    def __init__(self, network: Network, text: Conditioning):
        self.network = network
        self.text = text
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.network(x, t, self.text.cond_at(self.calls - 1), **self.text.cond_conditions(self.calls - 1))


class ClassifierFreeGuidance:
    """Guided output for the first ``guided_steps`` calls, the conditional pass alone after.

    Counts its calls (one per denoising step), so it is made afresh for each generation. With
    sub-prompts (``text.weights``) every call is guided: the pipeline refuses a shorter window and
    rescaling, which have no single conditional pass to fall back on.
    """

    def __init__(self, network: Network, text: Conditioning, scale: float, rescale: float, guided_steps: int):
        if text.uncond is None:
            raise ValueError("classifier-free guidance needs the unconditional text states")
        self.network = network
        self.text = text
        self.scale = scale
        self.rescale = rescale
        self.guided_steps = guided_steps
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        if step >= self.guided_steps:
            return self.network(x, t, self.text.cond_at(step), **self.text.cond_conditions(step))
        both = self.network(x, t, self.text.both_at(step), **self.text.both_conditions(step))
        out_uncond, *out_conds = both.chunk(1 + self.text.parts)
        if self.text.weights is None:
            output = out_uncond + self.scale * (out_conds[0] - out_uncond)
            return rescale_guidance(output, out_conds[0], self.rescale) if self.rescale > 0 else output
        # Composable diffusion's conjunction (Liu et al. 2022), as A1111's combine_denoised sums it.
        output = out_uncond.clone()
        for out_cond, weights in zip(out_conds, self.text.weights):
            for b, weight in enumerate(weights):
                output[b] += (out_cond[b] - out_uncond[b]) * (weight * self.scale)
        return output


class EmbeddedGuidance:
    """One pass per step of a guidance-distilled network, the scale given as its ``timestep_cond``.

    LCM (Luo et al. 2023, sec. 4.2, "guided distillation") trains the network on the guided target
    for a scale w drawn per sample, fed as an embedding of w; diffusers' LCM pipeline writes the scale
    in Imagen's convention (``scale``, 1 = unguided) and embeds w = scale - 1, as this does.
    """

    def __init__(self, network: Network, text: Conditioning, scale: float, embedding_dim: int):
        self.network = network
        self.text = text
        self.calls = 0
        w = torch.full((1,), scale - 1.0, device=text.states.device)
        self.w_embedding = guidance_scale_embedding(w, embedding_dim).to(text.states.dtype)  # (1, dim): every row's

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        step = self.calls - 1
        return self.network(x, t, self.text.cond_at(step), timestep_cond=self.w_embedding, **self.text.cond_conditions(step))


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
