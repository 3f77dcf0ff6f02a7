"""A run's grid: which timesteps (and VE sigmas) a sampling run visits, for n steps of a process.

A ``Schedule`` is the recipe, chosen per run and independent of the step rule:

    spacing           "leading", "linspace" or "trailing" timesteps (Lin et al. 2024, Table 2),
                      with ``steps_offset`` added to "leading" ones (SD uses 1)
    sigma_schedule    "spaced": the sigmas of those timesteps; "karras": Karras et al. 2022, eq. 5;
                      "exponential": evenly spaced in log sigma (k-diffusion ``get_sigmas_exponential``)
    timesteps/sigmas  the caller's own points, replacing the above (diffusers' ``set_timesteps(
                      timesteps=...)`` and ``sigmas=``): n descending timesteps, or n + 1
                      descending VE sigmas whose last is where the run ends

One function lays a recipe out per rule family, as diffusers' classes for that family lay it
out, so timesteps agree with diffusers exactly: ``timestep_grid`` (DDIM, DDPM: integer
timesteps), ``solver_grid`` (DPM-Solver, UniPC: spacing over n + 1 points with the lowest
dropped, Karras / exponential sigmas over the whole training range, integer timesteps),
``euler_grid`` (Euler: fractional timesteps, Karras / exponential sigmas over the spaced grid's
range, ending at sigma = 0) and ``lcm_grid`` (LCM: n of the N timesteps it was distilled on, Luo
et al. 2023; no spacing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
import torch

from ldm.errors import ConfigError
from ldm.schedulers.config import SchedulerConfig
from ldm.schedulers.noise import TimestepSpacing
from ldm.schedulers.process import NoiseProcess

SigmaSchedule = Literal["spaced", "karras", "exponential"]
FinalSigma = Literal["zero", "sigma_min"]  # where a sigma grid ends: clean data, or sigma(t = 0)
# Relative slack on the range of a caller's sigmas: sigmas copied from another program in float32.
SIGMA_RANGE_SLACK = 1e-4


# --- pure grid math --------------------------------------------------------------------------------


def spaced_timesteps(
    spacing: TimestepSpacing,
    num_inference_steps: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    *,
    reserve_final: bool = False,
) -> np.ndarray:
    """Descending training timesteps to visit (float64; "linspace" may be fractional, and
    schedulers that index ``alphas_cumprod`` round it, as diffusers does).

    Lin et al. 2024, Table 2 names the three spacings. "leading" takes every T//n-th step from 0
    and adds ``steps_offset`` (SD uses 1: 981, 961, ..., 1 for 50 steps); "trailing" counts down
    from T - 1; "linspace" spreads n points evenly over [0, T - 1].

    ``reserve_final``: solvers whose last step lands on clean data (sigma = 0; DPM-Solver, UniPC)
    lay "leading" and "linspace" grids over n + 1 points and drop the lowest one, which is the
    end point they step to; this is the grid diffusers uses for them.
    """
    n, big_t = num_inference_steps, num_train_timesteps
    if spacing == "trailing":
        ratio = big_t / n
        return np.round(np.arange(big_t, 0, -ratio)) - 1.0
    points = n + 1 if reserve_final else n
    if spacing == "leading":
        ratio = big_t // points
        grid = np.arange(0, points, dtype=np.float64) * ratio + steps_offset
    elif spacing == "linspace":
        grid = np.linspace(0, big_t - 1, points)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    grid = grid[::-1].copy()
    return grid[:-1] if reserve_final else grid


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log sigma from sigma_max down to sigma_min (k-diffusion's
    ``get_sigmas_exponential``, diffusers' ``use_exponential_sigmas``); Karras et al. 2022's
    eq. 5 in the limit rho -> infinity."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def skipped_timesteps(num_inference_steps: int, num_train_timesteps: int, original_steps: int) -> np.ndarray:
    """LCM's timesteps, descending (int64), as diffusers' LCMScheduler picks them.

    Luo et al. 2023, sec. 4.3 ("skipping-step"): the model was distilled on every k-th timestep,
    k = T // N for N = ``original_steps`` (k - 1, 2k - 1, ..., Nk - 1); a run of n steps takes n
    of those N points at evenly spaced indices from the noisiest (floor(i N / n), i = 0..n-1).
    """
    n, big_n, big_t = num_inference_steps, original_steps, num_train_timesteps
    if not 1 <= big_n <= big_t:
        raise ConfigError(f"original_inference_steps must be from 1 to {big_t} (the training timesteps), got {big_n}")
    if n > big_n:
        raise ConfigError(
            f"LCM takes at most original_inference_steps={big_n} steps, got {n}; use fewer steps "
            "or a larger original_inference_steps"
        )
    k = big_t // big_n
    distilled = np.arange(big_n, 0, -1, dtype=np.int64) * k - 1
    picks = np.floor(np.linspace(0, big_n, n, endpoint=False)).astype(np.int64)
    return distilled[picks]


# One function per sigma schedule that is not read off the spaced timesteps.
SIGMA_RAMPS = {"karras": karras_sigmas, "exponential": exponential_sigmas}


# --- the recipe ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Which points a run visits, before its step count is known. Defaults are SD's."""

    spacing: TimestepSpacing = "leading"
    steps_offset: int = 1  # added to "leading" timesteps
    sigma_schedule: SigmaSchedule = "spaced"
    timesteps: tuple[float, ...] | None = None  # the caller's own: n, descending, in [0, T - 1]
    sigmas: tuple[float, ...] | None = None  # the caller's own VE sigmas: n + 1, descending, end point last

    def __post_init__(self) -> None:
        for field, kind in (("spacing", TimestepSpacing), ("sigma_schedule", SigmaSchedule)):
            if getattr(self, field) not in get_args(kind):
                raise ConfigError(f"schedule {field} {getattr(self, field)!r} is not one of {', '.join(get_args(kind))}")
        if self.steps_offset < 0:
            raise ConfigError(f"steps_offset must be >= 0, got {self.steps_offset}")
        for field in ("timesteps", "sigmas"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, _values(getattr(self, field), field))
        self._check_own_points()

    @classmethod
    def from_config(cls, config: SchedulerConfig, sigma_schedule: SigmaSchedule = "spaced") -> Schedule:
        """The schedule a model's (filled) config asks for, with the sampler's sigma schedule."""
        return cls(config.timestep_spacing, config.steps_offset, sigma_schedule)

    def with_points(
        self, timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None
    ) -> Schedule:
        """This schedule with the caller's own timesteps or sigmas (either, or neither: itself)."""
        if timesteps is None and sigmas is None:
            return self
        return replace(self, timesteps=timesteps, sigmas=sigmas)

    @property
    def has_own_points(self) -> bool:
        return self.timesteps is not None or self.sigmas is not None

    def step_count(self, num_inference_steps: int | None, num_train_timesteps: int) -> int:
        """n: the step count asked for, or the number of the caller's own points (which a step
        count given beside them must equal)."""
        own = len(self.timesteps) if self.timesteps is not None else None
        own = len(self.sigmas) - 1 if self.sigmas is not None else own
        if own is not None:
            if num_inference_steps is not None and num_inference_steps != own:
                raise ConfigError(
                    f"num_inference_steps={num_inference_steps} but {own} steps given as timesteps or sigmas; "
                    "leave num_inference_steps out"
                )
            return own
        limit = num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= limit:
            raise ConfigError(f"num_inference_steps must be an integer from 1 to {limit}, got {num_inference_steps!r}")
        return num_inference_steps

    def _check_own_points(self) -> None:
        """What can be checked without the process: one kind of points, finite and strictly descending."""
        if self.timesteps is not None and self.sigmas is not None:
            raise ConfigError("give a run timesteps or sigmas, not both")
        own = "timesteps" if self.timesteps is not None else "sigmas" if self.sigmas is not None else None
        if own is None:
            return
        if self.sigma_schedule != "spaced":
            raise ConfigError(
                f"your own {own} replace {self.sigma_schedule} sigmas; drop use_{self.sigma_schedule}_sigmas or the {own}"
            )
        values = np.asarray(getattr(self, own), dtype=np.float64)
        least = 2 if own == "sigmas" else 1  # sigmas include the end point
        if len(values) < least:
            raise ConfigError(f"{own} must hold {least} or more numbers, got {len(values)}")
        # The end point may repeat the last sigma (a zero-length last step, as DPM-Solver's grids
        # ending at sigma(t = 0) have after Karras sigmas); every other step must go down.
        points = values[:-1] if own == "sigmas" else values
        ordered = not (np.diff(points) >= 0).any() and (own == "timesteps" or values[-1] <= values[-2])
        if not (np.isfinite(values).all() and values[-1] >= 0 and ordered):
            raise ConfigError(
                f"{own} must be finite numbers >= 0 in strictly descending order "
                f"(noisiest first{'; the end point last' if own == 'sigmas' else ''}); got {values.tolist()}"
            )


def _values(values: Sequence[float] | torch.Tensor | np.ndarray, name: str) -> tuple[float, ...]:
    """A caller's timesteps or sigmas as a tuple of floats (from a list, array or 1-D tensor)."""
    try:
        array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a flat sequence of numbers, got {values!r}") from None
    if array.ndim != 1:
        raise ConfigError(f"{name} must be a flat sequence of numbers, got shape {array.shape}")
    return tuple(float(v) for v in array)


# --- grids, laid out per rule family ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Grid:
    """One run's points: where the network is evaluated and, for rules that step in sigma, the
    VE sigma of each point plus the end point the last step lands on."""

    timesteps: torch.Tensor  # (n,) descending
    sigmas: torch.Tensor  # (n + 1,) float32, descending


def _whole_points(process: NoiseProcess, schedule: Schedule, who: str) -> torch.Tensor | None:
    """The caller's own timesteps for a sampler that steps between training timesteps (None if not
    given); sigmas and sigma schedules are refused for it."""
    if schedule.sigmas is not None:
        raise ConfigError(f"{who} steps between training timesteps, not sigmas; pass timesteps=[...] instead")
    if schedule.sigma_schedule != "spaced":
        raise ConfigError(f"{who} steps between training timesteps; it takes no {schedule.sigma_schedule} sigmas")
    if schedule.timesteps is None:
        return None
    return torch.from_numpy(own_timesteps(process, schedule, whole=True)).to(torch.int64)


def timestep_grid(process: NoiseProcess, schedule: Schedule, n: int) -> torch.Tensor:
    """Integer timesteps of DDIM and DDPM, as diffusers' DDIMScheduler / DDPMScheduler lay them out."""
    own = _whole_points(process, schedule, "this sampler")
    if own is not None:
        return own
    big_t = process.num_train_timesteps
    grid = spaced_timesteps(schedule.spacing, n, big_t, schedule.steps_offset)
    return checked_grid(torch.from_numpy(grid.round()).to(torch.int64), schedule, n, big_t)


def lcm_grid(process: NoiseProcess, schedule: Schedule, n: int, original_steps: int) -> torch.Tensor:
    """Integer timesteps of LCM: the skipped grid (``skipped_timesteps``), or the caller's own, as
    diffusers' LCMScheduler takes them. Its grid has no spacing: ``schedule.spacing`` is unused."""
    own = _whole_points(process, schedule, "LCM")
    if own is not None:
        return own
    return torch.from_numpy(skipped_timesteps(n, process.num_train_timesteps, original_steps))


def solver_grid(process: NoiseProcess, schedule: Schedule, n: int, end: FinalSigma) -> Grid:
    """The grid of the exponential-integrator solvers, as diffusers' DPMSolverMultistepScheduler
    and UniPCMultistepScheduler lay it out; the sigmas end at 0 or at sigma(t = 0) per ``end``."""
    if schedule.sigmas is not None:
        sigmas = own_sigmas(process, schedule, end)
        timesteps = process.timestep_at(sigmas[:-1]).round().astype(np.int64)
        return Grid(torch.from_numpy(timesteps), torch.from_numpy(sigmas))
    all_sigmas = process.ve_sigmas()
    if schedule.timesteps is not None:
        grid = own_timesteps(process, schedule, whole=True)
        sigmas = process.sigma_at(grid)
    elif schedule.sigma_schedule == "spaced":
        big_t = process.num_train_timesteps
        grid = spaced_timesteps(schedule.spacing, n, big_t, schedule.steps_offset, reserve_final=True).round()
        sigmas = process.sigma_at(grid)
    else:
        sigmas = SIGMA_RAMPS[schedule.sigma_schedule](float(all_sigmas[0]), float(all_sigmas[-1]), n)
        grid = process.timestep_at(sigmas)
        # diffusers rounds Karras timesteps (except for the cosine schedule) and truncates the others.
        if schedule.sigma_schedule == "karras" and process.config.beta_schedule != "squaredcos_cap_v2":
            grid = grid.round()
    final = 0.0 if end == "zero" else float(all_sigmas[0])
    sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
    timesteps = torch.from_numpy(grid.astype(np.int64))
    if not schedule.has_own_points:
        timesteps = checked_grid(timesteps, schedule, n, process.num_train_timesteps)
    return Grid(timesteps, sigmas)


def euler_grid(process: NoiseProcess, schedule: Schedule, n: int) -> Grid:
    """The grid of the Euler samplers, as diffusers' EulerDiscreteScheduler lays it out: fractional
    timesteps, Karras / exponential sigmas over the range of the spaced grid's, ending at 0."""
    if schedule.sigmas is not None:
        sigmas = own_sigmas(process, schedule, "zero")
        timesteps = process.timestep_at(sigmas[:-1]).astype(np.float32)
        return Grid(torch.from_numpy(timesteps), torch.from_numpy(sigmas))
    if schedule.timesteps is not None:
        grid = own_timesteps(process, schedule, whole=False).astype(np.float32)  # as diffusers reads them
    else:
        grid = spaced_timesteps(schedule.spacing, n, process.num_train_timesteps, schedule.steps_offset)
    # Fractional timesteps (linspace) get their sigma by linear interpolation, as in diffusers.
    sigmas = process.sigma_at(grid)
    if schedule.sigma_schedule != "spaced":
        sigmas = SIGMA_RAMPS[schedule.sigma_schedule](float(sigmas[-1]), float(sigmas[0]), n)
        grid = process.timestep_at(sigmas)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    timesteps = torch.from_numpy(grid.astype(np.float32))
    if not schedule.has_own_points:
        timesteps = checked_grid(timesteps, schedule, n, process.num_train_timesteps)
    return Grid(timesteps, sigmas)


# --- checks ------------------------------------------------------------------------------------------


def checked_grid(timesteps: torch.Tensor, schedule: Schedule, n: int, num_train_timesteps: int) -> torch.Tensor:
    """``timesteps`` if they lie in [0, T) and decrease (strictly for spaced sigmas; Karras and
    exponential grids rounded to timesteps may repeat one); "leading" spacing breaks this at step
    counts close to T, as it does in diffusers."""
    inside = bool((timesteps >= 0).all() and (timesteps <= num_train_timesteps - 1).all())
    steps = timesteps[:-1] - timesteps[1:]
    if schedule.sigma_schedule == "spaced":
        ordered = bool((steps > 0).all())
    else:
        ordered = bool((steps >= 0).all() and timesteps[0] > timesteps[-1])
    if not (inside and ordered):
        raise ConfigError(
            f"{n} steps do not fit {num_train_timesteps} training timesteps with "
            f"{schedule.spacing!r} spacing and steps_offset={schedule.steps_offset}; use fewer steps or "
            "trailing spacing (ldm txt2img --timestep-spacing trailing; timestep_spacing='trailing' in Python)"
        )
    return timesteps


def own_timesteps(process: NoiseProcess, schedule: Schedule, *, whole: bool) -> np.ndarray:
    """The caller's timesteps (float64), checked against the process: at most T - 1, and whole
    numbers for rules that index ``alphas_cumprod`` with them."""
    values = np.asarray(schedule.timesteps, dtype=np.float64)
    last = process.num_train_timesteps - 1
    if values[0] > last:
        raise ConfigError(f"timesteps must lie in [0, {last}] (the training timesteps); got {values[0]:g}")
    if whole and (values != np.round(values)).any():
        raise ConfigError(f"this sampler takes whole-number timesteps; got {[v for v in values if v != round(v)]}")
    return values


def own_sigmas(process: NoiseProcess, schedule: Schedule, end: FinalSigma) -> np.ndarray:
    """The caller's sigmas (float32, as diffusers reads them), checked against the process: all
    but the end point within the sigmas of its training timesteps."""
    sigmas = np.asarray(schedule.sigmas, dtype=np.float32)
    all_sigmas = process.ve_sigmas()
    lo, hi = float(all_sigmas[0]), float(all_sigmas[-1])
    points = sigmas[:-1]
    if points.min() < lo * (1 - SIGMA_RANGE_SLACK) or points.max() > hi * (1 + SIGMA_RANGE_SLACK):
        raise ConfigError(
            f"sigmas before the end point must lie in [{lo:.6g}, {hi:.6g}], the sigmas of this model's "
            f"training timesteps 0 and {len(all_sigmas) - 1}; got {float(points.min()):.6g} to {float(points.max()):.6g}"
        )
    if end == "sigma_min" and sigmas[-1] == 0:
        raise ConfigError(
            f"this sampler (noise-prediction DPM-Solver) cannot step to sigma 0; end the sigmas at a positive "
            f"value such as sigma(t = 0) = {lo:.6g}, or use dpm-solver++"
        )
    return sigmas
