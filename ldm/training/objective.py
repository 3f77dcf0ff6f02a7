"""The denoising objective: noise a latent, predict, weigh the squared error.

Notation (Ho et al. 2020): x_t = alpha_t x_0 + sigma_t eps with alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t); the signal-to-noise ratio is SNR(t) = alpha_t^2 / sigma_t^2.
The model's noise process (``ldm.schedulers.NoiseProcess``) supplies x_t (``add_noise``) and the regression target of the model's prediction
type (``training_target``: eps, v = alpha_t eps - sigma_t x_0, or x_0).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.random import randn


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) per timestep, read off the scheduler's own forward process x_t = alpha_t x_0 + sigma_t eps."""
    ones = torch.ones(len(timesteps), 1, 1, 1, dtype=torch.float64)
    zeros = torch.zeros_like(ones)
    alpha = scheduler.add_noise(ones, zeros, timesteps).flatten()
    sigma = scheduler.add_noise(zeros, ones, timesteps).flatten()
    return (alpha / sigma) ** 2


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, sec. 3.4).

    The paper's weight on the x_0-error is min(SNR, gamma). An eps-loss equals SNR times the
    x_0-loss and a v-loss (SNR + 1) times it, so the same weighting is min(SNR, gamma) / SNR for
    eps-prediction and min(SNR, gamma) / (SNR + 1) for v-prediction.
    """
    clipped = snr_t.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    return clipped


def sample_noise(shape: tuple[int, ...], generator: torch.Generator, device, dtype, offset: float) -> torch.Tensor:
    """Gaussian noise plus an optional per-image, per-channel constant ("noise offset", Guttenberg 2023).

    The constant lets the model change an image's mean brightness, which plain noise almost never
    asks it to do (the lowest frequency is nearly untouched by the forward process).
    """
    noise = randn(shape, generator, device, dtype)
    if offset:
        noise = noise + offset * randn((shape[0], shape[1], 1, 1), generator, device, dtype)
    return noise


def diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    added: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean (weighted) squared error of one batch: t ~ U{0..T-1}, eps ~ N(0, I), target by prediction type.

    ``added``: the U-Net's added-conditioning keywords (SDXL's ``text_embeds`` and ``time_ids``)."""
    batch = latents.shape[0]
    num_train_timesteps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(latents.device)
    noise = sample_noise(tuple(latents.shape), generator, latents.device, latents.dtype, noise_offset)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.training_target(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, context, **(added or {}))
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        weights = min_snr_weights(snr(scheduler, timesteps.cpu()), min_snr_gamma, scheduler.config.prediction_type)
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
