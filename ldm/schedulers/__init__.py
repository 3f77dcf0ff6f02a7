"""Schedulers: the denoising loop's step rule, picked by name.

    from ldm.schedulers import SchedulerConfig, create
    scheduler = create("dpm-solver++", SchedulerConfig(prediction_type="v_prediction"), solver_order=2)
    scheduler.set_timesteps(20)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)

See ``base.py`` for the contract and docs/samplers.md for the list and which to choose.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ldm.errors import ConfigError, SettingError
from ldm.schedulers.base import Scheduler, SchedulerConfig
from ldm.schedulers.diffusers_adapter import DiffusersScheduler, from_diffusers_scheduler
from ldm.schedulers.ddim import DDIMScheduler, DDPMScheduler
from ldm.schedulers.euler import EulerAncestralScheduler, EulerScheduler
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


__all__ = [
    "SCHEDULERS",
    "DiffusersScheduler",
    "Scheduler",
    "SchedulerConfig",
    "check_options",
    "create",
    "from_diffusers_scheduler",
]
