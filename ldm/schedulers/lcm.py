"""LCM: multistep sampling of a latent consistency model (Luo et al. 2023, "Latent Consistency Models").

A consistency model maps any point of a probability-flow ODE trajectory to its origin. LCM
distils it from an SD teacher (a full model, or an LCM-LoRA on the teacher's U-Net) and
parameterises it through the network's own x_0 estimate (Luo et al. 2023, sec. 4.1; the skip
connection of Song et al. 2023, "Consistency Models", eq. 5):

    f(z_t, t) = c_skip(t) z_t + c_out(t) x_0 hat(z_t, t)

Notation:

    x_0 hat     the network's clean-sample estimate ("pred_original_sample" in diffusers)
    f           the consistency function's output ("denoised" in diffusers)
    s           t * timestep_scaling, the time the boundary scalings see
    c_skip      sigma_data^2 / (s^2 + sigma_data^2), sigma_data = 0.5
    c_out       s / sqrt(s^2 + sigma_data^2)

c_skip(0) = 1, c_out(0) = 0: the boundary condition f(z, 0) = z. The scalings are the ones the
LCM authors' code and diffusers' LCMScheduler use (Song et al. 2023's, with t scaled up so that
f is x_0 hat except very near t = 0).

Multistep sampling (Song et al. 2023, Alg. 1; Luo et al. 2023's multistep latent consistency
sampling): evaluate f at the run's timestep tau_i, then noise the result afresh to the next one,
z_{tau_{i+1}} = sqrt(abar_{tau_{i+1}}) f + sqrt(1 - abar_{tau_{i+1}}) xi with new xi ~ N(0, I);
the last step returns f. The timesteps are a few of those LCM was distilled on
(``schedules.lcm_grid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.errors import ConfigError
from ldm.random import randn
from ldm.schedulers.base import Scheduler
from ldm.schedulers.config import LCM_DEFAULTS
from ldm.schedulers.schedules import Schedule, lcm_grid

DEFAULT_ORIGINAL_STEPS = 50  # diffusers' LCMScheduler default, and LCM's released models'
SIGMA_DATA = 0.5  # the data std the boundary scalings assume (Song et al. 2023; Karras et al. 2022)


@dataclass(frozen=True)
class LCMOptions:
    # N, the length of the grid the model was distilled on (every T // N-th timestep; Luo et al.
    # 2023, sec. 4.3); a run takes at most N steps. None: the model's scheduler config's, else 50
    # (diffusers' default, and LCM's released models').
    original_inference_steps: int | None = None
    # How far t is scaled in c_skip / c_out; larger makes f closer to x_0 hat (diffusers' default).
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        if self.original_inference_steps is not None:
            check_original_steps(self.original_inference_steps)
        if not 0 < self.timestep_scaling < math.inf:
            raise ConfigError(f"timestep_scaling must be a finite number > 0, got {self.timestep_scaling}")


def check_original_steps(n: object) -> None:
    """N must be a whole number of at least 1 (its upper bound, T, is checked with the process)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError(f"original_inference_steps must be a whole number, got {n!r}")
    if n < 1:
        raise ConfigError(f"original_inference_steps must be at least 1, got {n}")


class LCMScheduler(Scheduler):
    """Multistep latent consistency sampling (Luo et al. 2023), as diffusers' LCMScheduler."""

    Options = LCMOptions
    DIFFUSERS_DEFAULTS = LCM_DEFAULTS
    SPACED = False

    def _start_run(self, schedule: Schedule, n: int) -> None:
        self.timesteps = lcm_grid(self.process, schedule, n, self.original_steps)

    @property
    def original_steps(self) -> int:
        """N: the call's option, else the model's scheduler config's, else LCM's 50."""
        return self.options.original_inference_steps or self.config.original_inference_steps or DEFAULT_ORIGINAL_STEPS

    def boundary_scalings(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at timestep ``t``; see the module docstring."""
        s = t * self.options.timestep_scaling
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        i = self._begin_step(t)
        tau = int(self.timesteps[i])
        # 1. x_0 hat from the network output at tau (clipped / thresholded if the config says so).
        alpha, sigma = self.process.vp_coefficients(tau, model_output)
        x0, _ = self.process.to_x0_and_eps(model_output, sample, alpha, sigma)
        x0 = self.process.process_x0(x0)
        # 2. The consistency function f = c_skip z + c_out x_0 hat (Luo et al. 2023, sec. 4.1).
        c_skip, c_out = self.boundary_scalings(tau)
        denoised = c_out * x0 + c_skip * sample
        if i == len(self.timesteps) - 1:
            return denoised
        # 3. Fresh noise to the next timestep: q(z_next | x_0 = f) (Song et al. 2023, Alg. 1).
        alpha_next, sigma_next = self.process.vp_coefficients(int(self.timesteps[i + 1]), denoised)
        xi = randn(tuple(model_output.shape), generator, model_output.device, denoised.dtype)
        return alpha_next * denoised + sigma_next * xi
