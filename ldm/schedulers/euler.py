"""Euler and Euler-ancestral samplers in the sigma (variance-exploding) form of Karras et al. 2022.

Karras et al. 2022 write the probability-flow ODE in the VE variable x = x_VP / alpha_t, whose
noise level is sigma = sigma_t / alpha_t = sqrt((1 - abar) / abar):

    dx / dsigma = (x - D(x; sigma)) / sigma          (eq. 3 with sigma(t) = t, s(t) = 1)

where D is the denoiser (the predicted x_0). The scheduler's state is that VE x, as in k-diffusion
and diffusers: ``scale_model_input`` divides by sqrt(sigma^2 + 1) (giving the network its VP input),
and ``add_noise`` returns x_0 + sigma eps. The starting noise's std ``init_noise_sigma`` is
diffusers' choice: sigma_max for "linspace" and "trailing" spacing, sqrt(sigma_max^2 + 1) (the VE
state's std at sigma_max) for "leading".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.random import randn
from ldm.schedulers import noise
from ldm.schedulers.base import Scheduler, SigmaOptions
from ldm.schedulers.schedules import Schedule, euler_grid


@dataclass(frozen=True)
class EulerOptions(SigmaOptions):
    """Karras or exponential sigmas span the range of the spaced grid's sigmas (diffusers' Euler)."""


class EulerScheduler(Scheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with S_churn = 0)."""

    Options = EulerOptions

    def _start_run(self, schedule: Schedule, n: int) -> None:
        grid = euler_grid(self.process, schedule, n)
        self.timesteps, self.sigmas = grid.timesteps, grid.sigmas

    @property
    def init_noise_sigma(self) -> float:
        if self.num_inference_steps == 0:
            return 1.0
        sigma_max = float(self.sigmas.max())
        if self.schedule.spacing in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        sigma = self.sigmas[self._index_for_step(t)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """x_0 + sigma(t) eps: the VE form of q(x_t | x_0) that this scheduler's state uses."""
        sigma = self._sigma_at(t).to(device=x0.device, dtype=x0.dtype)
        return x0 + noise.broadcast_to(sigma, x0) * eps

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        i = self._begin_step(t)
        sample = sample.to(torch.float32)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        # 1. The denoiser D(x; sigma) = predicted x_0, from the network's VP view of x.
        x0 = self._denoise(model_output, sample, sigma)
        # 2. The ODE derivative d = (x - D) / sigma (Karras et al. 2022, Alg. 2 line 7).
        d = (sample - x0) / sigma
        # 3. The Euler step, or its ancestral split of sigma_next into a deterministic and a noise part.
        prev = self._move(sample, d, sigma, sigma_next, model_output, generator)
        return prev.to(model_output.dtype)

    def _move(self, x, d, sigma, sigma_next, model_output, generator):
        return x + d * (sigma_next - sigma)

    def _denoise(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha, sigma_t = noise.vp_from_ve(sigma)
        x0, _ = self.process.to_x0_and_eps(model_output, sample * alpha, alpha, sigma_t)
        return self.process.process_x0(x0)

    def _sigma_at(self, t: torch.Tensor | int | float) -> torch.Tensor:
        """1-D sigmas of the timesteps ``t``: this run's sigma where t is on its grid, else interpolated."""
        values = torch.as_tensor(t, dtype=torch.float64).flatten().cpu()
        sigmas = torch.from_numpy(self.process.sigma_at(values.numpy()))
        if self.num_inference_steps:
            grid = self.timesteps.double().cpu()
            for k, value in enumerate(values):
                hits = torch.isclose(grid, value).nonzero().flatten()
                if hits.numel():
                    sigmas[k] = float(self.sigmas[int(hits[0])])
        return sigmas.float()


class EulerAncestralScheduler(EulerScheduler):
    """Euler with ancestral sampling (k-diffusion ``sample_euler_ancestral``, eta = 1): each step
    goes deterministically to sigma_down and adds fresh noise of std sigma_up, where
    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and sigma_down^2 + sigma_up^2 = sigma_next^2,
    so the marginal matches the DDPM posterior's noise level."""

    def _move(self, x, d, sigma, sigma_next, model_output, generator):
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        z = randn(tuple(model_output.shape), generator, model_output.device, model_output.dtype)
        return x + d * (sigma_down - sigma) + z * sigma_up
