"""The model's trained noise process: what ComfyUI calls ``ModelSampling``.

A ``NoiseProcess`` is fixed by the model's training and never by a sampling run: the betas,
``alphas_cumprod`` (abar), the prediction type and the processing of predicted x_0 (clipping,
dynamic thresholding). Every step rule reads it, and training's forward process is it.

Notation (variance-preserving diffusion, Ho et al. 2020; Kingma et al. 2021), as in ``noise.py``:

    x_t = alpha_t x_0 + sigma_t eps,   alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)
    VE sigma(t) = sigma_t / alpha_t    (Karras et al. 2022, Table 1), the noise level of x_t / alpha_t

Timesteps t are training timesteps 0..T-1, fractional where a schedule asks for one between
them (its VE sigma is then interpolated linearly in t, as diffusers and k-diffusion do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ldm.errors import ConfigError
from ldm.schedulers import noise
from ldm.schedulers.config import SchedulerConfig
from ldm.schedulers.noise import PredictionType


@dataclass(frozen=True, eq=False)
class NoiseProcess:
    """The trained forward process q(x_t | x_0) and the model's output convention; immutable."""

    config: SchedulerConfig  # every key set (``filled_for``); the process reads its training keys
    betas: torch.Tensor  # beta_1..beta_T, float32
    alphas_cumprod: torch.Tensor  # abar_t, float32; 0 at t = T - 1 after zero-terminal-SNR rescaling

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> NoiseProcess:
        """The process of a config whose keys are all set (fill the left-out ones with ``filled_for``)."""
        if config.defaulted:
            raise ConfigError(
                f"scheduler config leaves {', '.join(sorted(config.defaulted))} to a sampler's defaults; "
                "fill them first: config.filled_for(SCHEDULERS[name].DIFFUSERS_DEFAULTS)"
            )
        betas = noise.betas_for(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
        if config.rescale_betas_zero_snr:
            betas = noise.rescale_zero_terminal_snr(betas)
        return cls(config, betas, noise.alphas_cumprod(betas))

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> PredictionType:
        return self.config.prediction_type

    # --- noise levels ---------------------------------------------------------------------------

    def vp_coefficients(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) at integer timesteps ``t``, shaped to broadcast against ``like``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        abar = self.alphas_cumprod[t.long()].to(device=like.device, dtype=like.dtype)
        abar = noise.broadcast_to(abar, like) if abar.ndim > 0 else abar
        return abar**0.5, (1 - abar) ** 0.5

    def ve_sigmas(self) -> np.ndarray:
        """VE sigma of every training timestep 0..T-1, ascending (float32). A zero terminal abar
        (zero-SNR rescaling) counts as 2^-24, so the last sigma is finite, as in diffusers."""
        return noise.ve_sigmas(noise.finite_terminal(self.alphas_cumprod)).numpy()

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """VE sigma at (possibly fractional) timesteps: linear interpolation in t."""
        sigmas = self.ve_sigmas()
        return np.interp(timesteps, np.arange(len(sigmas)), sigmas)

    def timestep_at(self, sigmas: np.ndarray) -> np.ndarray:
        """The fractional timestep of each VE sigma: linear interpolation in log sigma (the inverse
        of ``sigma_at`` up to the difference between the two interpolations)."""
        return noise.sigma_to_timestep(sigmas, np.log(self.ve_sigmas()))

    # --- the network's output ------------------------------------------------------------------

    def to_x0_and_eps(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        alpha_t: torch.Tensor | float,
        sigma_t: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) that the network's output implies at x_t = alpha_t x_0 + sigma_t eps."""
        return noise.to_x0_and_eps(model_output, sample, alpha_t, sigma_t, self.prediction_type)

    def denoised(self, model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The x_0 the network's output implies for the VP ``sample`` at the (possibly fractional)
        timestep ``t``: the denoised image a step is heading for (live previews)."""
        sigma = float(self.sigma_at(np.array([float(t)]))[0])  # VE sigma = sigma_t / alpha_t
        alpha = 1.0 / (1.0 + sigma**2) ** 0.5
        return self.to_x0_and_eps(model_output, sample, alpha, sigma * alpha)[0]

    def process_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The predicted x_0 after dynamic thresholding (Saharia et al. 2022) or static clipping, if set."""
        c = self.config
        if c.thresholding:
            return noise.dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        if c.clip_sample:
            return noise.clip_x0(x0, c.clip_sample_range)
        return x0

    @property
    def processes_x0(self) -> bool:
        """Whether ``process_x0`` changes anything."""
        return self.config.thresholding or self.config.clip_sample

    # --- the forward process, for img2img and training ------------------------------------------

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4), one t per sample or one for all."""
        alpha_t, sigma_t = self.vp_coefficients(t, x0)
        return alpha_t * x0 + sigma_t * eps

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The regression target of a network of this prediction type at (x0, eps, t)."""
        alpha_t, sigma_t = self.vp_coefficients(t, x0)
        return noise.prediction_from(x0, eps, alpha_t, sigma_t, self.prediction_type)

    def __repr__(self) -> str:
        c = self.config
        return f"NoiseProcess({c.beta_schedule}, T={c.num_train_timesteps}, {c.prediction_type})"
