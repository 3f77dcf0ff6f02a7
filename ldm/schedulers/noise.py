"""The noise-process math every scheduler shares, as pure functions (``NoiseProcess`` in
``process.py`` applies them to one model's process; a run's grid is made in ``schedules.py``).

Notation (variance-preserving diffusion, Ho et al. 2020; Kingma et al. 2021):

    x_t = alpha_t * x_0 + sigma_t * eps,   alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)

``abar`` is ``alphas_cumprod``. The samplers of Karras et al. 2022 and k-diffusion
work with the variance-exploding sigma ``sigma_t / alpha_t = sqrt((1 - abar) / abar)``;
``ve_sigmas`` gives it. Prediction types (what the network outputs):

    "epsilon"       eps
    "sample"        x_0
    "v_prediction"  v = alpha_t * eps - sigma_t * x_0   (Salimans & Ho 2022, sec. 4)

Beta schedules and ``alphas_cumprod`` are computed in float32 with the same
operations diffusers uses, so timesteps and trajectories agree with it to
float32 rounding.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

BetaSchedule = Literal["scaled_linear", "linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


# --- beta schedules -------------------------------------------------------------------------------


def betas_for(
    schedule: BetaSchedule, num_train_timesteps: int, beta_start: float, beta_end: float
) -> torch.Tensor:
    """Per-step noise variances beta_1..beta_T (float32)."""
    if schedule == "linear":
        # Ho et al. 2020, sec. 4: betas linear from 1e-4 to 0.02.
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        # Stable Diffusion (CompVis ldm "linear" schedule): linear in sqrt(beta), 0.00085 to 0.012.
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
        return root**2
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = num_train_timesteps
    betas = [min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Alg. 1.

    Shift and scale sqrt(abar) so that its last value is exactly 0 (pure noise at t = T)
    while its first value is unchanged.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


# --- noise levels ---------------------------------------------------------------------------------


def finite_terminal(abar: torch.Tensor) -> torch.Tensor:
    """``abar`` with a zero terminal value (zero-SNR rescaling) replaced by 2^-24, so samplers that
    divide by alpha_T or take log SNR stay finite; diffusers' sigma-based schedulers do the same."""
    if float(abar[-1]) > 0:
        return abar
    return torch.cat([abar[:-1], abar.new_full((1,), 2.0**-24)])


def ve_sigmas(abar: torch.Tensor) -> torch.Tensor:
    """Variance-exploding noise level sigma = sqrt((1 - abar) / abar) (Karras et al. 2022, Table 1)."""
    return ((1 - abar) / abar) ** 0.5


def vp_from_ve(ve_sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP (alpha_t, sigma_t) of a VE sigma: alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha."""
    alpha = 1 / (ve_sigma**2 + 1) ** 0.5
    return alpha, ve_sigma * alpha


def half_log_snr(ve_sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_t / sigma_t) (Lu et al. 2022, sec. 3.1) of a VE sigma."""
    alpha, sigma = vp_from_ve(ve_sigma)
    return torch.log(alpha) - torch.log(sigma)


def sigma_to_timestep(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose sigma is ``sigma``: linear interpolation in log sigma.

    ``log_sigmas`` holds log ve_sigma for t = 0..T-1 (ascending). This is the map k-diffusion's
    ``DiscreteSchedule.sigma_to_t`` and diffusers' ``_sigma_to_t`` use.
    """
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])
    w = np.clip(w, 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


# --- prediction-type conversions -------------------------------------------------------------------


def to_x0_and_eps(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor | float,
    sigma_t: torch.Tensor | float,
    prediction_type: PredictionType,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by the network output at x_t = alpha_t x_0 + sigma_t eps."""
    if prediction_type == "epsilon":
        eps = model_output
        return (sample - sigma_t * eps) / alpha_t, eps
    if prediction_type == "sample":
        x0 = model_output
        return x0, (sample - alpha_t * x0) / sigma_t
    if prediction_type == "v_prediction":
        # Salimans & Ho 2022, sec. 4 with alpha^2 + sigma^2 = 1: x_0 = alpha x - sigma v, eps = sigma x + alpha v.
        v = model_output
        return alpha_t * sample - sigma_t * v, alpha_t * v + sigma_t * sample
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def prediction_from(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor | float,
    sigma_t: torch.Tensor | float,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """What a perfect network of ``prediction_type`` outputs; the training target."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha_t * eps - sigma_t * x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


# --- x_0 clipping ----------------------------------------------------------------------------------


def clip_x0(x0: torch.Tensor, limit: float) -> torch.Tensor:
    """Static clipping of the predicted x_0 to [-limit, limit] (Ho et al. 2020, pixel models)."""
    return x0.clamp(-limit, limit)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen), sec. 2.3: per sample, s = the ``ratio`` quantile of |x_0|,
    clamped to [1, max_value]; x_0 is clipped to [-s, s] and divided by s."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs full precision
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) per-sample tensor to (B, 1, 1, ...) so it broadcasts against ``like``."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))
