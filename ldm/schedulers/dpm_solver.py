"""Multistep DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b), orders 1 to 3.

Both integrate the probability-flow ODE exactly in its linear part and approximate the network
term by a polynomial in lambda = log(alpha_t / sigma_t) (half the log-SNR), using the outputs of
previous steps (multistep):

    DPM-Solver    integrates the noise prediction eps(x, lambda)  (Lu et al. 2022, sec. 3)
    DPM-Solver++  integrates the data prediction x_0(x, lambda)   (Lu et al. 2022b, sec. 4)

Notation: s0, s1, s2 are the current and two previous timesteps, t the next one; alpha, sigma are
the VP coefficients (x = alpha x_0 + sigma eps); h = lambda_t - lambda_s0; D0, D1, D2 are the
divided differences of the network term. First order is DDIM (Lu et al. 2022, sec. 4.1).

The grid and the order schedule follow diffusers' ``DPMSolverMultistepScheduler``: warm-up with
lower orders, a first-order last step, and with ``lower_order_final`` and fewer than 15 steps a
second-order penultimate step (Lu et al. 2022b, sec. 5: higher orders are unstable at few steps).
DPM-Solver++ ends at sigma = 0 (the clean sample); DPM-Solver, whose eps form cannot step to
sigma = 0, ends at the sigma of timestep 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ldm.errors import ConfigError
from ldm.random import randn
from ldm.schedulers.base import Scheduler, SigmaOptions
from ldm.schedulers.noise import half_log_snr, vp_from_ve
from ldm.schedulers.schedules import Schedule, solver_grid


@dataclass(frozen=True)
class DPMSolverOptions(SigmaOptions):
    solver_order: int = 2  # 2 for guided sampling, 3 for unconditional (Lu et al. 2022b, sec. 5)
    solver_type: Literal["midpoint", "heun"] = "midpoint"  # second-order variant; both are order 2
    lower_order_final: bool = True  # lower orders on the last steps when fewer than 15 steps

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_order not in (1, 2, 3):
            raise ConfigError(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        if self.solver_type not in ("midpoint", "heun"):
            raise ConfigError(f"solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")


class DPMSolverScheduler(Scheduler):
    """Multistep DPM-Solver on the noise prediction (Lu et al. 2022; multistep form of Lu et al. 2022b)."""

    Options = DPMSolverOptions
    predicts_data = False  # which network term is integrated: eps (DPM-Solver) or x_0 (DPM-Solver++)
    stochastic = False
    final_sigma_zero = False

    def _start_run(self, schedule: Schedule, n: int) -> None:
        grid = solver_grid(self.process, schedule, n, "zero" if self.final_sigma_zero else "sigma_min")
        self.timesteps, self.sigmas = grid.timesteps, grid.sigmas
        self._outputs: list[torch.Tensor] = []  # converted network terms of previous steps, newest last

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        i = self._begin_step(t)
        o, n = self.options, len(self.timesteps)
        # 1. Half log-SNR lambda = log(alpha / sigma) at the current and next points.
        alpha_s, sigma_s = vp_from_ve(self.sigmas[i])
        alpha_t, sigma_t = vp_from_ve(self.sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        # 2. The network term this solver integrates, from the model output.
        self._outputs = [*self._outputs, self._network_term(model_output, sample, i)][-o.solver_order :]
        if bool(self.sigmas[i + 1] == self.sigmas[i]):
            # A zero-length step (the last one of a grid that ends at t = 0 when the end point is
            # sigma(t = 0)): nothing to integrate, and the divided differences would divide by h = 0.
            return sample
        # 3. Order of this step: warm-up uses the outputs available; the last steps drop order.
        order = min(o.solver_order, len(self._outputs))
        few_steps = o.lower_order_final and n < 15
        if i == n - 1 and (few_steps or self.final_sigma_zero):
            order = 1
        elif i == n - 2 and few_steps:
            order = min(order, 2)
        # 4. Scaled divided differences D0, D1, D2 of the outputs in lambda (Lu et al. 2022b, sec. 4).
        sample = sample.to(torch.float32)
        lambdas = [half_log_snr(self.sigmas[i - k]) for k in range(order)]
        h = lambda_t - lambdas[0]
        m = self._outputs[::-1]  # m[0] newest
        d0, d1, d2 = m[0], None, None
        if order >= 2:
            r0 = (lambdas[0] - lambdas[1]) / h
            d1_0 = (m[0] - m[1]) / r0
            d1 = d1_0
        if order == 3:
            r1 = (lambdas[1] - lambdas[2]) / h
            d1_1 = (m[1] - m[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
        # 5. The update itself.
        z = None
        if self.stochastic:
            z = randn(tuple(model_output.shape), generator, model_output.device, torch.float32)
        prev = self._update(sample, h, (alpha_s, sigma_s), (alpha_t, sigma_t), d0, d1, d2, z)
        return prev.to(model_output.dtype)

    def _network_term(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        alpha, sigma = vp_from_ve(self.sigmas[i])
        x0, eps = self.process.to_x0_and_eps(model_output, sample, alpha, sigma)
        if not self.process.processes_x0:
            return x0 if self.predicts_data else eps
        x0 = self.process.process_x0(x0)
        return x0 if self.predicts_data else (sample - alpha * x0) / sigma

    def _update(self, x, h, s, t, d0, d1, d2, z):
        """DPM-Solver on eps: DPM-Solver-1 (Lu et al. 2022, sec. 3.3) plus the multistep terms."""
        (alpha_s, _), (alpha_t, sigma_t) = s, t
        em1 = torch.expm1(h)  # e^h - 1
        prev = (alpha_t / alpha_s) * x - sigma_t * em1 * d0
        if d1 is not None and d2 is None and self.options.solver_type == "midpoint":
            return prev - 0.5 * sigma_t * em1 * d1
        if d1 is not None:
            prev = prev - sigma_t * (em1 / h - 1.0) * d1
        if d2 is not None:
            prev = prev - sigma_t * ((em1 - h) / h**2 - 0.5) * d2
        return prev


class DPMSolverPlusPlusScheduler(DPMSolverScheduler):
    """Multistep DPM-Solver++ on the data prediction (Lu et al. 2022b, Alg. 2 and its third-order form)."""

    predicts_data = True
    final_sigma_zero = True

    def _update(self, x, h, s, t, d0, d1, d2, z):
        """x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0 + higher terms (Lu et al. 2022b, Alg. 2)."""
        (_, sigma_s), (alpha_t, sigma_t) = s, t
        em1 = torch.expm1(-h)  # e^-h - 1
        prev = (sigma_t / sigma_s) * x - alpha_t * em1 * d0
        if d1 is not None and d2 is None and self.options.solver_type == "midpoint":
            return prev - 0.5 * alpha_t * em1 * d1
        if d1 is not None:
            prev = prev + alpha_t * (em1 / h + 1.0) * d1
        if d2 is not None:
            prev = prev - alpha_t * ((em1 + h) / h**2 - 0.5) * d2
        return prev


class DPMSolverPlusPlusSDEScheduler(DPMSolverPlusPlusScheduler):
    """SDE-DPM-Solver++ multistep (Lu et al. 2022b, "SDE-DPM-Solver++(2M)"): the same data-prediction
    polynomial integrated along the reverse SDE, with fresh Gaussian noise every step."""

    stochastic = True

    def _update(self, x, h, s, t, d0, d1, d2, z):
        (_, sigma_s), (alpha_t, sigma_t) = s, t
        em2 = -torch.expm1(-2.0 * h)  # 1 - e^-2h
        prev = (sigma_t / sigma_s) * torch.exp(-h) * x + alpha_t * em2 * d0
        if d1 is not None and d2 is None and self.options.solver_type == "midpoint":
            prev = prev + 0.5 * alpha_t * em2 * d1
        elif d1 is not None:
            prev = prev + alpha_t * (em2 / (-2.0 * h) + 1.0) * d1
        if d2 is not None:
            prev = prev + alpha_t * ((em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
        return prev + sigma_t * em2.sqrt() * z
