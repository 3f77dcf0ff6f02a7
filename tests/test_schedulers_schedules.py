"""A run's grid (ldm.schedulers.schedules): spacings, Karras and exponential sigmas, the caller's
own timesteps or sigmas, and the checks on them. Parity of whole runs with diffusers on these
grids is in test_schedulers_parity.py."""

import diffusers
import numpy as np
import pytest
import torch

from ldm.errors import ConfigError
from ldm.schedulers import SCHEDULERS, NoiseProcess, Schedule, SchedulerConfig, create, schedules
from ldm.schedulers.base import SigmaOptions
from ldm.schedulers.schedules import euler_grid, solver_grid, timestep_grid

NAMES = list(SCHEDULERS)
SIGMA_RULES = [name for name in NAMES if issubclass(SCHEDULERS[name].Options, SigmaOptions)]
TIMESTEP_RULES = [name for name in NAMES if name not in SIGMA_RULES]  # ddim, ddpm, lcm
SD = NoiseProcess.from_config(SchedulerConfig())  # SD 1.5: scaled_linear, leading, steps_offset 1


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.6 * torch.tanh(x) + 0.2 * x * (float(t) / 1000) - 0.05


def run(scheduler, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(seed + 1)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)
    return x


# --- pure grid math --------------------------------------------------------------------------------


def test_karras_sigmas_follow_eq5():
    sigmas = schedules.karras_sigmas(0.03, 14.6, 10, rho=7.0)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    roots = sigmas ** (1 / 7)
    assert np.allclose(np.diff(roots), np.diff(roots)[0])  # evenly spaced in sigma^(1/rho)


def test_exponential_sigmas_are_evenly_spaced_in_log_sigma():
    sigmas = schedules.exponential_sigmas(0.03, 14.6, 10)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    assert np.allclose(np.diff(np.log(sigmas)), np.log(0.03 / 14.6) / 9)
    # Karras et al. 2022 eq. 5 tends to it as rho grows.
    assert np.allclose(schedules.karras_sigmas(0.03, 14.6, 10, rho=1e5), sigmas, rtol=1e-3)
    assert not np.allclose(schedules.karras_sigmas(0.03, 14.6, 10), sigmas, rtol=1e-3)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333])
def test_spacing_equals_diffusers(spacing, steps):
    cfg = SchedulerConfig(timestep_spacing=spacing).to_diffusers()
    ddim = diffusers.DDIMScheduler.from_config(cfg)
    ddim.set_timesteps(steps)
    grid = schedules.spaced_timesteps(spacing, steps, 1000, 1)
    assert np.array_equal(grid.round().astype(np.int64), ddim.timesteps.numpy())
    euler = diffusers.EulerDiscreteScheduler.from_config(cfg)
    euler.set_timesteps(steps)
    assert np.allclose(grid.astype(np.float32), euler.timesteps.numpy(), rtol=1e-6)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    dpm.set_timesteps(steps)
    reserved = schedules.spaced_timesteps(spacing, steps, 1000, 1, reserve_final=True)
    assert np.array_equal(reserved.round().astype(np.int64), dpm.timesteps.numpy())


def test_leading_spacing_is_the_sd_grid():
    grid = schedules.spaced_timesteps("leading", 50, 1000, 1)
    assert grid[0] == 981 and grid[-1] == 1 and np.all(np.diff(grid) == -20)


# --- grids per rule family -------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_spacing_lays_out_each_family_grid(spacing):
    schedule = Schedule(spacing, steps_offset=1)
    ints = timestep_grid(SD, schedule, 10)
    assert ints.dtype == torch.int64 and len(ints) == 10 and bool((ints[1:] < ints[:-1]).all())
    solver = solver_grid(SD, schedule, 10, "zero")
    # Spread over 11 points with the lowest dropped: it is where the last step lands.
    expected = schedules.spaced_timesteps(spacing, 10, 1000, 1, reserve_final=True).round()
    assert solver.timesteps.tolist() == expected.tolist()
    assert len(solver.sigmas) == 11 and float(solver.sigmas[-1]) == 0.0
    assert torch.allclose(solver.sigmas[:-1].double(), torch.from_numpy(SD.sigma_at(expected)), rtol=1e-6)
    euler = euler_grid(SD, schedule, 10)
    assert euler.timesteps.dtype == torch.float32 and float(euler.sigmas[-1]) == 0.0
    assert torch.allclose(euler.timesteps.double(), torch.from_numpy(schedules.spaced_timesteps(spacing, 10, 1000, 1)))


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_karras_and_exponential_grids_span_their_ranges(kind):
    schedule = Schedule("leading", 1, kind)
    all_sigmas = SD.ve_sigmas()
    solver = solver_grid(SD, schedule, 12, "sigma_min")
    # DPM-Solver and UniPC: the whole training range, then the end point sigma(t = 0).
    assert float(solver.sigmas[0]) == pytest.approx(float(all_sigmas[-1]), rel=1e-6)
    assert float(solver.sigmas[-2]) == pytest.approx(float(all_sigmas[0]), rel=1e-6)
    assert float(solver.sigmas[-1]) == pytest.approx(float(all_sigmas[0]), rel=1e-6)
    euler = euler_grid(SD, schedule, 12)
    # Euler: the range of the spaced grid's sigmas (leading: t = 901 down to 1).
    spaced = euler_grid(SD, Schedule("leading", 1), 12).sigmas
    assert float(euler.sigmas[0]) == pytest.approx(float(spaced[0]), rel=1e-6)
    assert float(euler.sigmas[-2]) == pytest.approx(float(spaced[-2]), rel=1e-6)
    # Each kind's own spacing: even in sigma^(1/7), or in log sigma.
    transform = (lambda s: s ** (1 / 7)) if kind == "karras" else np.log
    for sigmas in (solver.sigmas[:-1], euler.sigmas[:-1]):
        steps = np.diff(transform(sigmas.double().numpy()))
        assert np.allclose(steps, steps[0], rtol=1e-4)
    # Timesteps follow the sigmas: t(sigma), rounded for the integer-timestep solvers.
    back = SD.timestep_at(euler.sigmas[:-1].double().numpy())
    assert torch.allclose(euler.timesteps.double(), torch.from_numpy(back), atol=1e-3)


def test_leading_spacing_past_the_last_timestep_points_to_trailing():
    with pytest.raises(ConfigError, match="1000 steps do not fit 1000 training timesteps.*trailing"):
        timestep_grid(SD, Schedule("leading", 1), 1000)
    assert len(timestep_grid(SD, Schedule("trailing", 1), 1000)) == 1000


# --- the caller's own points -------------------------------------------------------------------------


def test_own_timesteps_are_used_as_given():
    own = Schedule().with_points(timesteps=[999, 700, 400.0, 5])
    assert own.timesteps == (999.0, 700.0, 400.0, 5.0) and own.step_count(None, 1000) == 4
    assert timestep_grid(SD, own, 4).tolist() == [999, 700, 400, 5]
    solver = solver_grid(SD, own, 4, "sigma_min")
    assert solver.timesteps.tolist() == [999, 700, 400, 5]
    assert float(solver.sigmas[-1]) == pytest.approx(float(SD.ve_sigmas()[0]))  # the rule's end point
    euler = euler_grid(SD, Schedule().with_points(timesteps=torch.tensor([998.5, 10.25])), 2)
    assert euler.timesteps.tolist() == [998.5, 10.25]  # Euler takes fractional timesteps
    assert float(euler.sigmas[0]) == pytest.approx(float(SD.sigma_at(np.array([998.5]))[0]), rel=1e-6)


def test_own_sigmas_are_used_as_given_with_their_end_point():
    sigmas = [14.0, 3.0, 0.5, 0.1, 0.0]
    own = Schedule().with_points(sigmas=sigmas)
    assert own.step_count(None, 1000) == 4 and own.step_count(4, 1000) == 4
    for grid in (euler_grid(SD, own, 4), solver_grid(SD, own, 4, "zero")):
        assert torch.allclose(grid.sigmas, torch.tensor(sigmas))
        assert torch.allclose(grid.timesteps.double(), torch.from_numpy(SD.timestep_at(np.array(sigmas[:-1]))), atol=0.5)
    assert solver_grid(SD, own, 4, "zero").timesteps.dtype == torch.int64


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({"timesteps": [500, 600]}, "strictly descending"),
        ({"timesteps": [500, 500]}, "strictly descending"),
        ({"timesteps": [500, -1]}, ">= 0"),
        ({"timesteps": []}, "1 or more numbers"),
        ({"timesteps": [900, float("nan")]}, "finite"),
        ({"sigmas": [14.0]}, "2 or more numbers"),
        ({"sigmas": [1.0, 3.0, 0.0]}, "strictly descending"),
        ({"sigmas": [[14.0, 0.0]]}, "flat sequence"),
        ({"timesteps": [900, [10, 5]]}, "flat sequence"),
        ({"timesteps": [900, 10], "sigmas": [14.0, 0.0]}, "not both"),
    ],
)
def test_bad_own_points_are_refused_before_any_grid(points, message):
    with pytest.raises(ConfigError, match=message):
        Schedule().with_points(**points)


def test_own_points_are_checked_against_the_process_and_the_rule():
    with pytest.raises(ConfigError, match=r"\[0, 999\].*1000"):
        timestep_grid(SD, Schedule().with_points(timesteps=[1000, 10]), 2)
    with pytest.raises(ConfigError, match="whole-number timesteps.*500.5"):
        solver_grid(SD, Schedule().with_points(timesteps=[900, 500.5]), 2, "zero")
    with pytest.raises(ConfigError, match="not sigmas; pass timesteps"):
        timestep_grid(SD, Schedule().with_points(sigmas=[14.0, 0.0]), 1)
    with pytest.raises(ConfigError, match="must lie in"):
        euler_grid(SD, Schedule().with_points(sigmas=[80.0, 1.0, 0.0]), 2)  # above sigma(t = 999) = 14.6
    with pytest.raises(ConfigError, match="must lie in"):
        euler_grid(SD, Schedule().with_points(sigmas=[10.0, 0.001, 0.0]), 2)  # below sigma(t = 0)
    with pytest.raises(ConfigError, match="cannot step to sigma 0"):
        solver_grid(SD, Schedule().with_points(sigmas=[10.0, 1.0, 0.0]), 2, "sigma_min")
    with pytest.raises(ConfigError, match="replace karras sigmas"):
        Schedule(sigma_schedule="karras").with_points(timesteps=[900, 10])


def test_step_count_checks():
    with pytest.raises(ConfigError, match="num_inference_steps must be an integer from 1 to 1000"):
        Schedule().step_count(None, 1000)
    with pytest.raises(ConfigError, match="num_inference_steps must be an integer"):
        Schedule().step_count(1001, 1000)
    with pytest.raises(ConfigError, match="num_inference_steps=3 but 2 steps given"):
        Schedule().with_points(timesteps=[900, 10]).step_count(3, 1000)
    with pytest.raises(ConfigError, match="sigma_schedule 'beta'"):
        Schedule(sigma_schedule="beta")
    with pytest.raises(ConfigError, match="steps_offset"):
        Schedule(steps_offset=-1)


# --- through the scheduler contract -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_own_timesteps_equal_to_the_spaced_ones_give_the_same_run(name):
    scheduler = create(name, SchedulerConfig(timestep_spacing="trailing"))
    scheduler.set_timesteps(8)
    spaced = scheduler.timesteps.clone()
    expected = run(scheduler)
    scheduler.set_timesteps(timesteps=spaced.tolist())
    assert torch.equal(scheduler.timesteps, spaced) and scheduler.num_inference_steps == 8
    torch.testing.assert_close(run(scheduler), expected, rtol=0, atol=0)
    scheduler.set_timesteps(timesteps=[999, 500, 100])  # and different ones give a different run
    assert scheduler.timesteps.tolist() == [999, 500, 100] and len(scheduler.timesteps) == 3


@pytest.mark.parametrize("name", SIGMA_RULES)
@pytest.mark.parametrize("kind", ["spaced", "karras"])
def test_own_sigmas_equal_to_the_schedules_give_the_same_run(name, kind):
    template = create(name, use_karras_sigmas=kind == "karras")
    template.set_timesteps(8)
    sigmas, expected = template.sigmas.clone(), run(template)
    scheduler = create(name)
    scheduler.set_timesteps(sigmas=sigmas)
    assert torch.equal(scheduler.sigmas, sigmas)
    # The timesteps come back from the sigmas (t(sigma(t)) = t up to rounding): the network's t input.
    torch.testing.assert_close(run(scheduler), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="replace"):
        create(name, use_exponential_sigmas=True).set_timesteps(sigmas=sigmas)


@pytest.mark.parametrize("name", TIMESTEP_RULES)
def test_timestep_rules_refuse_sigmas(name):
    with pytest.raises(ConfigError, match="pass timesteps"):
        create(name).set_timesteps(sigmas=[10.0, 1.0, 0.0])


@pytest.mark.parametrize("name", SIGMA_RULES)
def test_exponential_sigmas_are_an_option_of_every_sigma_rule(name):
    scheduler = create(name, use_exponential_sigmas=True)
    assert scheduler.schedule.sigma_schedule == "exponential"
    scheduler.set_timesteps(10)
    log_steps = np.diff(np.log(scheduler.sigmas[:-1].double().numpy()))
    assert np.allclose(log_steps, log_steps[0], rtol=1e-4)
    with pytest.raises(ConfigError, match="exclude each other"):
        create(name, use_karras_sigmas=True, use_exponential_sigmas=True)


@pytest.mark.parametrize("name", TIMESTEP_RULES)
def test_timestep_rules_take_no_sigma_schedule(name):
    with pytest.raises(ConfigError, match="does not take option"):
        create(name, use_exponential_sigmas=True)
