"""Schedulers: the denoising loop's sampler, picked by name, made of three parts.

    from ldm.schedulers import SchedulerConfig, create
    scheduler = create("dpm-solver++", SchedulerConfig(prediction_type="v_prediction"), solver_order=2)
    scheduler.set_timesteps(20)  # or set_timesteps(timesteps=[...]) / set_timesteps(sigmas=[...])
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)

The parts, as k-diffusion and ComfyUI separate them:

    config.py     SchedulerConfig: how the model was trained (its scheduler_config.json)
    process.py    NoiseProcess: the trained noise process (betas, alphas_cumprod, prediction type)
    schedules.py  Schedule: the run's timesteps or sigmas (spacing, Karras, exponential, own points)
    ddim.py, dpm_solver.py, euler.py, unipc.py, lcm.py: the step rules, only their update math

A scheduler is the three combined: ``create(name, config, **options)``, or by hand
``SCHEDULERS[name].from_parts(process, schedule, **options)``; each pipeline call builds its own.
See ``base.py`` for the contract and docs/samplers.md for the list and which to choose.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ldm.errors import ConfigError, SettingError
from ldm.schedulers.base import Scheduler
from ldm.schedulers.config import SchedulerConfig
from ldm.schedulers.process import NoiseProcess
from ldm.schedulers.schedules import Schedule
from ldm.schedulers.diffusers_adapter import DiffusersScheduler, from_diffusers_scheduler
from ldm.schedulers.ddim import DDIMScheduler, DDPMScheduler
from ldm.schedulers.euler import EulerAncestralScheduler, EulerScheduler
from ldm.schedulers.lcm import LCMScheduler
from ldm.schedulers.unipc import UniPCScheduler
from ldm.schedulers.dpm_solver import DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSDEScheduler, DPMSolverScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverScheduler,
    "dpm-solver++": DPMSolverPlusPlusScheduler,
    "dpm-solver++-sde": DPMSolverPlusPlusSDEScheduler,
    "euler": EulerScheduler,
    "euler-ancestral": EulerAncestralScheduler,
    "unipc": UniPCScheduler,
    "lcm": LCMScheduler,
}


def create(name: str, config: SchedulerConfig | None = None, **options: Any) -> Scheduler:
    """Build the scheduler registered as ``name`` with its typed ``options`` (see ``SCHEDULERS``)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config, **options)


def check_options(name: str, options: dict[str, Any]) -> None:
    """A ``SettingError`` naming ``{option}`` and ``{scheduler}`` for an option the scheduler ``name`` does not take."""
    takes = {field.name for field in fields(SCHEDULERS[name].Options)}
    for option in options:
        if option not in takes:
            users = [other for other, cls in SCHEDULERS.items() if option in {f.name for f in fields(cls.Options)}]
            raise SettingError(f"{{{option}}} does not apply to {{scheduler}} {name}; it applies to {', '.join(users)}")


def check_spacing(name: str, spacing: str | None) -> None:
    """A ``SettingError`` for a call's ``{timestep_spacing}`` where the scheduler ``name`` lays out no spacing."""
    if spacing is not None and not SCHEDULERS[name].SPACED:
        raise SettingError(
            f"{{timestep_spacing}} does not apply to {{scheduler}} {name}: its timesteps are the ones its model "
            "was distilled on; leave it out"
        )


__all__ = [
    "SCHEDULERS",
    "DiffusersScheduler",
    "NoiseProcess",
    "Schedule",
    "Scheduler",
    "SchedulerConfig",
    "check_options",
    "check_spacing",
    "create",
    "from_diffusers_scheduler",
]
