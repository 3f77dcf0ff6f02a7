"""Use any diffusers scheduler object through ldm's scheduler contract.

This module is the one place that knows how diffusers schedulers differ from ours: ``step``
returns an output object, some steps take a ``generator`` and some (PNDM, LMS, Heun) do not,
and ``init_noise_sigma`` may be a tensor. The pipeline therefore never inspects a scheduler.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ldm.errors import ConfigError
from ldm.schedulers import noise
from ldm.schedulers.config import SchedulerConfig


class DiffusersScheduler:
    """A diffusers scheduler (``SchedulerMixin``) behind the ldm contract; see ``base.py``."""

    def __init__(self, scheduler: Any) -> None:
        from diffusers import SchedulerMixin  # imported here: diffusers is slow to import

        if not isinstance(scheduler, SchedulerMixin):
            raise ConfigError(f"{type(scheduler).__name__} is not a diffusers scheduler; pass one from diffusers")
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise ConfigError(
                f"{type(scheduler).__name__} has no alphas_cumprod; ldm models need a DDPM-type noise schedule"
            )
        self.diffusers = scheduler
        self.config = SchedulerConfig.from_diffusers(dict(scheduler.config))
        # The signature checks of ldm: diffusers' step() signatures differ per class, and a
        # stochastic sampler must receive the caller's generator while others must not get one;
        # only some classes' set_timesteps take a caller's own timesteps or sigmas.
        self._step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        takes = inspect.signature(scheduler.set_timesteps).parameters
        self._takes_points = frozenset(name for name in ("timesteps", "sigmas") if name in takes)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.diffusers.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return float(self.diffusers.init_noise_sigma)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        given = (("timesteps", timesteps), ("sigmas", sigmas))
        points = {name: [float(v) for v in values] for name, values in given if values is not None}
        if not points:
            self.diffusers.set_timesteps(num_inference_steps, device=device)
            return
        refused = sorted(points.keys() - self._takes_points)
        if refused:
            raise ConfigError(f"{type(self.diffusers).__name__}.set_timesteps takes no {' or '.join(refused)}")
        count = len(points["timesteps"]) if "timesteps" in points else len(points["sigmas"]) - 1  # sigmas end with the end point
        if num_inference_steps is not None and num_inference_steps != count:
            raise ConfigError(f"num_inference_steps={num_inference_steps} but {count} steps given; leave it out")
        try:  # diffusers refuses a step count beside them, and checks the points with ValueErrors
            self.diffusers.set_timesteps(device=device, **points)
        except ValueError as error:
            raise ConfigError(f"{type(self.diffusers).__name__}: {error}") from None

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        return self.diffusers.scale_model_input(sample, t)

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        if self._step_takes_generator:
            return self.diffusers.step(model_output, t, sample, generator=generator).prev_sample
        return self.diffusers.step(model_output, t, sample).prev_sample

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        return self.diffusers.add_noise(x0, eps, torch.as_tensor(t, device=x0.device).reshape(-1))

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        abar = self.diffusers.alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device).long()]
        abar = noise.broadcast_to(abar.to(x0.dtype).reshape(-1), x0)
        return noise.prediction_from(x0, eps, abar**0.5, (1 - abar) ** 0.5, self.config.prediction_type)

    def __repr__(self) -> str:
        return f"DiffusersScheduler({type(self.diffusers).__name__})"


def from_diffusers_scheduler(scheduler: Any) -> DiffusersScheduler:
    """Wrap a diffusers scheduler object so the pipeline can use schedulers ldm does not ship."""
    return DiffusersScheduler(scheduler)
