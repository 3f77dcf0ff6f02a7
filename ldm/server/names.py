"""AUTOMATIC1111's names for samplers and schedule types, and how they map to ldm's settings.

A1111 names a sampler ("DPM++ 2M", aliases such as "k_dpmpp_2m") and, separately since 1.9, its
schedule type ("Automatic", "Karras", "Exponential"); older clients join the two ("DPM++ 2M Karras").
ldm's names are ``GenerationSettings.scheduler`` (``SAMPLER_NAMES`` maps them to A1111's) and
``GenerationSettings.sigma_schedule`` (``SIGMA_SCHEDULES``); this module only looks names up.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldm import checks
from ldm.errors import SettingError
from ldm.settings import SAMPLER_NAMES, SIGMA_SCHEDULES

# A1111's aliases of the samplers ldm has (modules/sd_samplers_kdiffusion.py and friends).
SAMPLER_ALIASES = {
    "DDIM": ("ddim",),
    "DDPM": ("ddpm",),
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde", "k_dpmpp_2m_sde_ka"),
    "Euler": ("k_euler",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "UniPC": ("unipc",),
    "LCM": ("k_lcm",),
}
# A1111's schedule types of ldm's sigma schedules, as /schedulers lists them: (name, label, default rho).
# The labels are the infotext's "Schedule type" values (ldm.settings.SIGMA_SCHEDULES).
SCHEDULE_TYPES = {
    "spaced": ("automatic", SIGMA_SCHEDULES["spaced"], -1.0),
    "karras": ("karras", SIGMA_SCHEDULES["karras"], 7.0),
    "exponential": ("exponential", SIGMA_SCHEDULES["exponential"], 1.0),
}


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler ldm runs: its name, aliases, and ldm's scheduler."""

    name: str
    aliases: tuple[str, ...]
    scheduler: str


def samplers() -> list[Sampler]:
    """The samplers ldm has, by A1111's names (a scheduler added to ``SAMPLER_NAMES`` appears here)."""
    return [Sampler(a1111, SAMPLER_ALIASES.get(a1111, ()), ours) for ours, a1111 in SAMPLER_NAMES.items()]


def _sampler_index() -> dict[str, str]:
    """Every accepted spelling (name, alias, ldm's own name), lower-cased -> ldm's scheduler."""
    index = {}
    for sampler in samplers():
        for spelling in (sampler.name, *sampler.aliases, sampler.scheduler):
            index[spelling.lower()] = sampler.scheduler
    return index


def _schedule_index() -> dict[str, str]:
    """Every accepted spelling of a schedule type (name and label), lower-cased -> ``sigma_schedule``."""
    return {spelling.lower(): ours for ours, (name, label, _) in SCHEDULE_TYPES.items() for spelling in (name, label)}


class SamplerNotFound(LookupError):
    """A sampler name A1111's API answers with 400 "Sampler not found"."""


def resolve_sampler(sampler_name: str, schedule_type: str | None) -> tuple[str, str]:
    """(ldm scheduler, sigma_schedule) of an A1111 sampler name and schedule type.

    A legacy joined name ("DPM++ 2M Karras") carries its schedule type; an explicit one other than
    "Automatic" must then agree with it. ``SamplerNotFound`` for a sampler ldm does not have.
    """
    samplers_by_name, schedules = _sampler_index(), _schedule_index()
    schedule = schedules.get((schedule_type or "automatic").lower())
    if schedule is None:
        labels = ", ".join(label for _, label, _ in SCHEDULE_TYPES.values())
        raise SettingError(f"unknown {{sigma_schedule}} {checks.shown(schedule_type)}; choose one of {labels}")
    key = sampler_name.strip().lower()
    if key in samplers_by_name:
        return samplers_by_name[key], schedule
    base, _, suffix = key.rpartition(" ")
    if base in samplers_by_name and suffix in schedules:
        if schedule != "spaced" and schedule != schedules[suffix]:
            raise SettingError(
                f"{{sigma_schedule}} {checks.shown(schedule_type)} disagrees with the sampler name "
                f"{checks.shown(sampler_name)}; give one"
            )
        return samplers_by_name[base], schedules[suffix]
    raise SamplerNotFound(sampler_name)


def schedule_label(sigma_schedule: str) -> str:
    return SCHEDULE_TYPES[sigma_schedule][1]
