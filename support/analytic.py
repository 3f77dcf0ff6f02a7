"""Exact denoisers for data whose distribution is known: the oracle for testing schedulers.

If every coordinate of x_0 is drawn i.i.d. from a 1-D mixture of Gaussians
sum_k w_k N(mu_k, s_k^2), the forward marginal at a timestep with alpha = sqrt(abar),
sigma = sqrt(1 - abar) is again a mixture,

    p_t(x) = sum_k w_k N(x; alpha mu_k, alpha^2 s_k^2 + sigma^2),

and the minimum-mean-squared-error predictions a perfectly trained network would output are

    E[x_0 | x_t] = sum_k r_k(x_t) (mu_k + alpha s_k^2 (x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2))
    E[eps | x_t] = (x_t - alpha E[x_0 | x_t]) / sigma

with r_k(x_t) the posterior responsibilities of the components. One component gives the
Gaussian case eps* = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2). v and x_0 networks follow
from the shared conversions in ``ldm.schedulers.noise``. Because the probability-flow ODE of 1-D data is a
monotone map, the exact sampler output for a stratified start is the data quantiles, which lets
``distribution_error`` measure a deterministic sampler without Monte-Carlo noise. The same
monotone map is what a perfect consistency model outputs (``consistency``): x_t's ODE origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldm.schedulers import noise
from ldm.schedulers.noise import PredictionType


@dataclass(frozen=True)
class GaussianMixture1D:
    """Per-coordinate data distribution sum_k weights[k] N(means[k], stds[k]^2)."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    @classmethod
    def gaussian(cls, mean: float, std: float) -> GaussianMixture1D:
        return cls((1.0,), (mean,), (std,))

    @property
    def mean(self) -> float:
        return float(sum(w * m for w, m in zip(self.weights, self.means)))

    @property
    def std(self) -> float:
        second = sum(w * (s**2 + m**2) for w, m, s in zip(self.weights, self.means, self.stds))
        return math.sqrt(second - self.mean**2)

    def predict(self, x_t: torch.Tensor, abar: torch.Tensor | float, prediction_type: PredictionType) -> torch.Tensor:
        """What a perfect network of ``prediction_type`` outputs at x_t (VP scaling) and abar."""
        x = x_t.double()
        abar = float(abar)
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        log_resp, x0_parts = [], []
        for w, mu, s in zip(self.weights, self.means, self.stds):
            var_t = alpha**2 * s**2 + sigma**2  # variance of this component at t
            centred = x - alpha * mu
            log_resp.append(math.log(w) - 0.5 * math.log(var_t) - 0.5 * centred**2 / var_t)
            x0_parts.append(mu + (alpha * s**2 / var_t) * centred)  # E[x_0 | x_t, component]
        resp = torch.softmax(torch.stack(log_resp), dim=0)
        x0 = (resp * torch.stack(x0_parts)).sum(0)
        eps = (x - alpha * x0) / sigma
        return noise.prediction_from(x0, eps, alpha, sigma, prediction_type).to(x_t.dtype)

    def consistency(self, x_t: torch.Tensor, abar: torch.Tensor | float, prediction_type: PredictionType) -> torch.Tensor:
        """What a perfect consistency model (Song et al. 2023) of ``prediction_type`` outputs at x_t:
        the origin of x_t's probability-flow ODE trajectory as its x_0. The 1-D flow is monotone,
        so the origin is the data quantile at x_t's level under p_t, F_0^-1(F_t(x_t))."""
        x = x_t.double()
        abar = float(abar)
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        if len(self.weights) == 1:  # the linear map between N(alpha mu, alpha^2 s^2 + sigma^2) and N(mu, s^2)
            mu, s = self.means[0], self.stds[0]
            x0 = mu + s * (x - alpha * mu) / math.sqrt(alpha**2 * s**2 + sigma**2)
        else:
            grid, cdf = self._cdf(abar)
            levels = np.interp(x.flatten().numpy(), grid.numpy(), cdf.numpy())
            x0 = torch.from_numpy(self._quantiles(1.0, levels)).reshape(x.shape)
        eps = (x - alpha * x0) / sigma
        return noise.prediction_from(x0, eps, alpha, sigma, prediction_type).to(x_t.dtype)

    def marginal_quantiles(self, abar: float, count: int) -> torch.Tensor:
        """The (i + 0.5) / count quantiles, i < count, of p_t (abar = 1 gives the data's quantiles)."""
        levels = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        if len(self.weights) == 1:
            alpha, sigma2 = math.sqrt(abar), 1 - abar
            std = math.sqrt(alpha**2 * self.stds[0] ** 2 + sigma2)
            return alpha * self.means[0] + std * torch.special.ndtri(levels)
        return torch.from_numpy(self._quantiles(abar, levels.numpy()))

    def _quantiles(self, abar: float, levels: np.ndarray) -> np.ndarray:
        """The mixture p_t's quantiles at ``levels``, by inverting its CDF on a fine grid."""
        grid, cdf = self._cdf(abar)
        return np.interp(levels, cdf.numpy(), grid.numpy())

    def _cdf(self, abar: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid, CDF of p_t on it), over +-12 component stds (interpolation error ~ 1e-7 of the spread)."""
        alpha, sigma2 = math.sqrt(abar), 1 - abar
        means = [alpha * mu for mu in self.means]
        stds = [math.sqrt(alpha**2 * s**2 + sigma2) for s in self.stds]
        lo = min(m - 12 * s for m, s in zip(means, stds))
        hi = max(m + 12 * s for m, s in zip(means, stds))
        grid = torch.linspace(lo, hi, 50_001, dtype=torch.float64)
        cdf = sum(w * torch.special.ndtr((grid - m) / s) for w, m, s in zip(self.weights, means, stds))
        return grid, cdf

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        component = torch.multinomial(torch.tensor(self.weights), count, replacement=True, generator=generator)
        z = torch.randn(count, generator=generator, dtype=torch.float64)
        mu = torch.tensor(self.means, dtype=torch.float64)[component]
        return mu + torch.tensor(self.stds, dtype=torch.float64)[component] * z


def abar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """abar at a possibly fractional timestep, interpolating the VE sigma linearly in t as the
    sigma-based schedulers do (exact at integer t)."""
    sigmas = noise.ve_sigmas(noise.finite_terminal(alphas_cumprod).double()).numpy()
    sigma = float(np.interp(float(t), np.arange(len(sigmas)), sigmas))
    return torch.tensor(1.0 / (1.0 + sigma**2), dtype=torch.float64)


def run_sampler(scheduler, data: GaussianMixture1D, num_steps: int, count: int, *, start_index: int = 0,
                generator: torch.Generator | None = None, network: str = "denoiser") -> torch.Tensor:
    """Sample ``count`` scalars with the exact ``network`` ("denoiser": ``data.predict``;
    "consistency": ``data.consistency``, for consistency samplers such as LCM), starting from the
    exact marginal at ``timesteps[start_index]`` (stratified); return the sampler's output (float64)."""
    predict = {"denoiser": data.predict, "consistency": data.consistency}[network]
    scheduler.set_timesteps(num_steps)
    prediction_type = scheduler.config.prediction_type
    t0 = scheduler.timesteps[start_index]
    x_vp = data.marginal_quantiles(float(abar_at(scheduler.alphas_cumprod, t0)), count)
    x = (x_vp * state_scale(scheduler, t0)).float().reshape(count, 1)
    for t in scheduler.timesteps[start_index:]:
        model_input = scheduler.scale_model_input(x, t)
        output = predict(model_input, abar_at(scheduler.alphas_cumprod, t), prediction_type)
        x = scheduler.step(output, t, x, generator=generator)
    return x.double().flatten()


def state_scale(scheduler, t: torch.Tensor | float) -> float:
    """Factor from the VP sample to the scheduler's state at t: 1 for DDPM-type schedulers and
    1 / alpha_t for the VE-scaled Euler family; read off ``add_noise`` (linear in the noise)."""
    unit = scheduler.add_noise(torch.zeros(1, 1), torch.ones(1, 1), torch.as_tensor(t).reshape(1))
    return float(unit) / float((1 - abar_at(scheduler.alphas_cumprod, t)).sqrt())


def distribution_error(samples: torch.Tensor, data: GaussianMixture1D) -> float:
    """1-Wasserstein distance between the samples' empirical law and the data law, via quantiles."""
    exact = data.marginal_quantiles(1.0, samples.numel())
    return float((samples.sort().values - exact).abs().mean())
