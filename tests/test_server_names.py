"""A1111's sampler and schedule-type names -> ldm's settings (no server, no model)."""

from __future__ import annotations

import pytest

from ldm.errors import SettingError
from ldm.server.names import SCHEDULE_TYPES, SamplerNotFound, resolve_sampler, samplers
from ldm.settings import SAMPLER_NAMES, SIGMA_SCHEDULES


def test_every_ldm_sampler_has_its_a1111_name_and_schedule_types_match():
    assert [(s.scheduler, s.name) for s in samplers()] == list(SAMPLER_NAMES.items())
    assert set(SCHEDULE_TYPES) == set(SIGMA_SCHEDULES)
    assert {label for _, label, _ in SCHEDULE_TYPES.values()} == set(SIGMA_SCHEDULES.values())


@pytest.mark.parametrize(
    ("name", "schedule", "expected"),
    [
        ("DPM++ 2M", None, ("dpm-solver++", "spaced")),
        ("DPM++ 2M", "Karras", ("dpm-solver++", "karras")),
        ("DPM++ 2M", "karras", ("dpm-solver++", "karras")),
        ("DPM++ 2M Karras", None, ("dpm-solver++", "karras")),
        ("DPM++ 2M Karras", "Automatic", ("dpm-solver++", "karras")),
        ("DPM++ 2M SDE Karras", None, ("dpm-solver++-sde", "karras")),
        ("Euler a", "Exponential", ("euler-ancestral", "exponential")),
        ("k_euler_a", None, ("euler-ancestral", "spaced")),
        ("euler", None, ("euler", "spaced")),
        ("dpm-solver++", None, ("dpm-solver++", "spaced")),
    ],
)
def test_names_aliases_and_legacy_joined_names(name, schedule, expected):
    assert resolve_sampler(name, schedule) == expected


def test_unknown_names():
    with pytest.raises(SamplerNotFound):
        resolve_sampler("Heun", None)
    with pytest.raises(SamplerNotFound):
        resolve_sampler("Euler Cosine", None)
    with pytest.raises(SettingError) as error:
        resolve_sampler("Euler", "Cosine")
    assert error.value.fields == ["sigma_schedule"]
    with pytest.raises(SettingError):
        resolve_sampler("DPM++ 2M Karras", "Exponential")
