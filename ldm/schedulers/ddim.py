"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models") and DDPM as its eta = 1 case.

Notation (Song et al. 2021 write alpha_t for what we call abar_t = alphas_cumprod[t]):

    x_0 hat    predicted clean sample ("pred_original_sample" in diffusers)
    eps hat    predicted noise
    abar_prev  abar at the next timestep of the run; after the last one, DDIM uses
               abar_0 = alphas_cumprod[0] (the SD convention, diffusers' ``set_alpha_to_one=False``)
               and DDPM uses 1 (Ho et al. 2020, Alg. 2 returns the mean of the last step)

Each step moves to the next timestep of ``timesteps`` (``schedules.timestep_grid``, or the
caller's own). For "leading" and "trailing" spacing with n dividing T this is diffusers'
``t - T // n``; for other grids diffusers' DDIM steps to ``t - T // n`` although the next model
call is at the next grid point, and we step to that point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.errors import ConfigError
from ldm.random import randn
from ldm.schedulers.base import NoOptions, Scheduler
from ldm.schedulers.config import LEADING_DEFAULTS
from ldm.schedulers.schedules import Schedule, timestep_grid


@dataclass(frozen=True)
class DDIMOptions:
    eta: float = 0.0  # 0: deterministic DDIM; 1: the DDPM posterior variance (Song et al. 2021, eq. 16)

    def __post_init__(self) -> None:
        if not 0 <= self.eta < math.inf:
            raise ConfigError(f"eta must be a finite number >= 0, got {self.eta}")


class DDIMScheduler(Scheduler):
    """DDIM sampling, Song et al. 2021, eq. 12 with the variance of eq. 16 scaled by eta."""

    Options = DDIMOptions
    DIFFUSERS_DEFAULTS = LEADING_DEFAULTS

    def _start_run(self, schedule: Schedule, n: int) -> None:
        self.timesteps = timestep_grid(self.process, schedule, n)
        # abar along the run: one value per timestep plus the final value the last step lands on.
        self._abars = torch.cat([self.alphas_cumprod[self.timesteps], self._final_abar()])

    def _final_abar(self) -> torch.Tensor:
        return self.alphas_cumprod[:1]

    def _eta(self) -> float:
        return self.options.eta

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        i = self._begin_step(t)
        # 1. abar_t and abar_prev of this step.
        abar_t, abar_prev = self._abars[i], self._abars[i + 1]
        # 2. x_0 hat and eps hat from the network output (eq. 9 solved for x_0).
        alpha_t, sigma_t = abar_t**0.5, (1 - abar_t) ** 0.5
        x0, eps = self.process.to_x0_and_eps(model_output, sample, alpha_t, sigma_t)
        x0 = self.process.process_x0(x0)
        # 3. sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev), eq. 16.
        eta = self._eta()
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        std = eta * variance**0.5
        # 4. eq. 12: x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z.
        # (clamped: at eta = 1 and abar_t = 0, zero terminal SNR, the direction term is 0 up to rounding)
        prev = abar_prev**0.5 * x0 + (1 - abar_prev - std**2).clamp(min=0) ** 0.5 * eps
        if float(std) > 0:
            z = randn(tuple(model_output.shape), generator, model_output.device, model_output.dtype)
            prev = prev + std * z
        return prev


class DDPMScheduler(DDIMScheduler):
    """Ancestral DDPM sampling (Ho et al. 2020, eq. 6-7, fixed-small variance beta tilde).

    Sampling x_{t-1} ~ q(x_{t-1} | x_t, x_0 hat) is DDIM's eq. 12 with eta = 1: the posterior mean
    of eq. 7 and variance beta tilde = (1 - abar_{t-1}) / (1 - abar_t) * (1 - abar_t / abar_{t-1}).
    With fewer than T steps the same holds between the chosen timesteps (Nichol & Dhariwal 2021,
    sec. 4, "strided sampling").
    """

    Options = NoOptions

    def _final_abar(self) -> torch.Tensor:
        # Ho et al. 2020, Alg. 2: the last step returns the posterior mean at abar = 1, without noise.
        return torch.ones(1, dtype=self.alphas_cumprod.dtype)

    def _eta(self) -> float:
        return 1.0
