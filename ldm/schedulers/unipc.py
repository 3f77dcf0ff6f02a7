"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), multistep, on the data prediction x_0, orders 1 to 3.

Each step has two halves that share one network evaluation:

    UniC (corrector)  on arrival at s0 with the new output m_s0, re-solve the step just taken,
                      s_-1 -> s0, with m_s0 added to the polynomial (order p + 1 from p outputs);
    UniP (predictor)  step s0 -> t with the outputs at s0, s_-1, ..., like DPM-Solver++.

Both are the exponential integrator of DPM-Solver++ (Lu et al. 2022b) with a correction term
alpha_t B(h) sum_k rho_k D_k, where D_k = (m_k - m_s0) / r_k are scaled differences of earlier
outputs, r_k = (lambda_k - lambda_s0) / h, and rho solves R rho = b with R_ik = r_k^(i-1) and b
from the phi-function expansion of the integral (Zhao et al. 2023, sec. 3); B(h) is h ("bh1") or
e^h - 1 ("bh2"). The grid, the
order schedule (warm-up, lower orders on the last steps) and the variants follow diffusers'
``UniPCMultistepScheduler`` with ``predict_x0=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ldm.errors import ConfigError
from ldm.schedulers.base import Scheduler, SigmaOptions
from ldm.schedulers.noise import vp_from_ve
from ldm.schedulers.schedules import Schedule, solver_grid


@dataclass(frozen=True)
class UniPCOptions(SigmaOptions):
    solver_order: int = 2  # 2 for guided sampling, 3 for unconditional
    solver_type: Literal["bh1", "bh2"] = "bh2"  # B(h) = h or e^h - 1; bh2 is better at few steps
    lower_order_final: bool = True  # reduce the order on the last steps
    disable_corrector: tuple[int, ...] = ()  # step indices whose arrival is not corrected

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_order not in (1, 2, 3):
            raise ConfigError(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        if self.solver_type not in ("bh1", "bh2"):
            raise ConfigError(f"solver_type must be 'bh1' or 'bh2', got {self.solver_type!r}")


class UniPCScheduler(Scheduler):
    """Multistep UniPC with the UniC corrector after every step (Zhao et al. 2023)."""

    Options = UniPCOptions

    def _start_run(self, schedule: Schedule, n: int) -> None:
        grid = solver_grid(self.process, schedule, n, "zero")
        self.timesteps, self.sigmas = grid.timesteps, grid.sigmas
        self._outputs: list[torch.Tensor] = []  # x_0 predictions of previous points, newest last
        self._last_sample: torch.Tensor | None = None  # x before the last predictor step
        self._last_order = 0

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        i = self._begin_step(t)
        o = self.options
        # 1. The data prediction at the current point s0 = sigmas[i].
        alpha, sigma = vp_from_ve(self.sigmas[i])
        x0, _ = self.process.to_x0_and_eps(model_output, sample, alpha, sigma)
        x0 = self.process.process_x0(x0)
        # 2. UniC: correct the arrival at s0 using the new output (no extra network call).
        if self._last_sample is not None and (i - 1) not in o.disable_corrector:
            sample = self._corrector(i, x0, sample)
        self._outputs = [*self._outputs, x0][-o.solver_order :]
        # 3. Order of the predictor: warm-up, and fewer steps left than the order at the end.
        order = min(o.solver_order, len(self._outputs))
        if o.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        self._last_sample, self._last_order = sample, order
        # 4. UniP: predict the next point t = sigmas[i + 1].
        return self._predictor(i, order, sample).to(model_output.dtype)

    def _predictor(self, i: int, order: int, x: torch.Tensor) -> torch.Tensor:
        m = self._outputs[::-1]  # m[0] at s0 = sigmas[i], m[k] at sigmas[i - k]
        base, alpha_t, b_h, rks, b, h_phi_1 = self._terms(i, i + 1, order, x, m[0])
        if order == 1:
            return base
        diffs = [(m[k] - m[0]) / rks[k - 1] for k in range(1, order)]
        # Order 2 uses rho = 1/2 (the h -> 0 limit of b_1), as the reference implementation does.
        rhos = [0.5] if order == 2 else list(torch.linalg.solve(_powers(rks)[:-1, :-1], b[:-1]))
        residual = sum(rho * d for rho, d in zip(rhos, diffs))
        return base - alpha_t * b_h * residual

    def _corrector(self, i: int, x0_new: torch.Tensor, x_arrived: torch.Tensor) -> torch.Tensor:
        """Redo the step sigmas[i - 1] -> sigmas[i] from the previous sample with x0_new included."""
        order = self._last_order
        m = self._outputs[::-1]  # m[0] at sigmas[i - 1], m[k] at sigmas[i - 1 - k]
        base, alpha_t, b_h, rks, b, _ = self._terms(i - 1, i, order, self._last_sample, m[0])
        diffs = [(m[k] - m[0]) / rks[k - 1] for k in range(1, order)]
        rhos = [0.5] if order == 1 else list(torch.linalg.solve(_powers(rks), b))  # 1/2: as above
        residual = sum(rho * d for rho, d in zip(rhos[:-1], diffs)) + rhos[-1] * (x0_new - m[0])
        return base - alpha_t * b_h * residual

    def _terms(self, s: int, t: int, order: int, x: torch.Tensor, m0: torch.Tensor):
        """Shared pieces of a step sigmas[s] -> sigmas[t] with outputs at sigmas[s], sigmas[s-1], ...:
        the first-order (DPM-Solver++ / DDIM) result, alpha_t, B(h), the ratios r_k and the vector b."""
        alpha_s, sigma_s = vp_from_ve(self.sigmas[s])
        alpha_t, sigma_t = vp_from_ve(self.sigmas[t])
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = torch.log(alpha_t) - torch.log(sigma_t) - lambda_s
        rks = []
        for k in range(1, order):
            alpha_k, sigma_k = vp_from_ve(self.sigmas[s - k])
            rks.append((torch.log(alpha_k) - torch.log(sigma_k) - lambda_s) / h)
        hh = -h  # the data-prediction form integrates in -lambda
        h_phi_1 = torch.expm1(hh)
        b_h = hh if self.options.solver_type == "bh1" else h_phi_1
        # b_k = k! hh phi_{k+1}(hh) / B(h) with the recursion phi_{k+1}(h) = (phi_k(h) - 1/k!) / h.
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        base = (sigma_t / sigma_s) * x.to(torch.float32) - alpha_t * h_phi_1 * m0
        return base, alpha_t, b_h, rks, torch.stack(b), h_phi_1


def _powers(rks: list[torch.Tensor]) -> torch.Tensor:
    """The square matrix R whose row k holds r^k over the ratios r_1..r_{p-1} and r = 1."""
    r = torch.stack([*rks, torch.ones((), dtype=torch.float32)])
    return torch.stack([r**k for k in range(len(r))])
