"""The noise process (ldm.schedulers.process) and a scheduler as process x schedule x step rule."""

import dataclasses

import numpy as np
import pytest
import torch

from ldm.errors import ConfigError
from ldm.schedulers import SCHEDULERS, NoiseProcess, Schedule, SchedulerConfig, create
from ldm.schedulers.base import SigmaOptions
from ldm.schedulers.config import LEADING_DEFAULTS

NAMES = list(SCHEDULERS)
SIGMA_RULES = [name for name in NAMES if issubclass(SCHEDULERS[name].Options, SigmaOptions)]


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.6 * torch.tanh(x) + 0.2 * x * (float(t) / 1000) - 0.05


def run(scheduler, steps: int = 7) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)
    return x


def pair(seed: int) -> torch.Tensor:
    return torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the process ------------------------------------------------------------------------------------


def test_a_process_needs_every_key_set():
    release = SchedulerConfig.sd_release()
    with pytest.raises(ConfigError, match="filled_for"):
        NoiseProcess.from_config(release)
    process = NoiseProcess.from_config(release.filled_for(LEADING_DEFAULTS))
    assert process.num_train_timesteps == 1000 and process.prediction_type == "epsilon"
    assert process.config.prediction_type == "epsilon" and not process.config.defaulted
    left_out = SchedulerConfig(defaulted=frozenset({"clip_sample"}))
    assert NoiseProcess.from_config(left_out.filled_for(LEADING_DEFAULTS)).processes_x0  # DDIM's diffusers default


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_add_noise_and_training_target_round_trip_through_the_output_conversion(prediction_type):
    process = NoiseProcess.from_config(SchedulerConfig(prediction_type=prediction_type))
    x0, eps, t = pair(1), pair(2), torch.tensor([0, 400, 999])
    x_t, target = process.add_noise(x0, eps, t), process.training_target(x0, eps, t)
    alpha, sigma = process.vp_coefficients(t, x0)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert torch.allclose(alpha.flatten()**2, process.alphas_cumprod[t].double())
    got_x0, got_eps = process.to_x0_and_eps(target, x_t, alpha, sigma)
    assert torch.allclose(got_x0, x0, atol=1e-6) and torch.allclose(got_eps, eps, atol=1e-6)


def test_sigma_and_timestep_conversions_invert_each_other():
    process = NoiseProcess.from_config(SchedulerConfig())
    sigmas = process.ve_sigmas()
    abar = process.alphas_cumprod.double().numpy()
    assert np.allclose(sigmas, np.sqrt((1 - abar) / abar), rtol=1e-6) and bool((np.diff(sigmas) > 0).all())
    t = np.arange(1000, dtype=np.float64)
    assert np.allclose(process.sigma_at(t), sigmas) and np.allclose(process.timestep_at(sigmas), t, atol=1e-3)
    # Between timesteps sigma is linear in t and t is linear in log sigma: inverse up to that difference.
    fractional = np.array([0.5, 17.25, 500.5, 998.9])
    back = process.timestep_at(process.sigma_at(fractional))
    assert np.allclose(back, fractional, atol=0.05) and (np.floor(back) == np.floor(fractional)).all()


def test_zero_terminal_snr_keeps_the_terminal_sigma_finite():
    process = NoiseProcess.from_config(SchedulerConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    assert float(process.alphas_cumprod[-1]) == 0.0
    assert np.isfinite(process.ve_sigmas()).all() and process.ve_sigmas()[-1] == pytest.approx(2.0**12, rel=1e-6)


def test_x0_processing_follows_the_config():
    x0 = torch.tensor([[-3.0, -0.5, 0.25, 2.0]])
    plain = NoiseProcess.from_config(SchedulerConfig())
    clipped = NoiseProcess.from_config(SchedulerConfig(clip_sample=True, clip_sample_range=1.5))
    threshold = SchedulerConfig(thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=2.0)
    thresholded = NoiseProcess.from_config(threshold)
    assert not plain.processes_x0 and torch.equal(plain.process_x0(x0), x0)
    assert clipped.processes_x0 and clipped.process_x0(x0).tolist() == [[-1.5, -0.5, 0.25, 1.5]]
    # s = max |x0| = 3, clamped to sample_max_value = 2: clip to [-2, 2] and divide by 2.
    assert thresholded.process_x0(x0).tolist() == [[-1.0, -0.25, 0.125, 1.0]]


def test_the_training_forward_process_is_ddpms():
    config = SchedulerConfig.sd_release("v_prediction")
    process = NoiseProcess.from_config(config.filled_for(LEADING_DEFAULTS))
    ddpm = create("ddpm", config)
    x0, eps, t = pair(3).float(), pair(4).float(), torch.tensor([5, 500, 995])
    assert torch.equal(process.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t))
    assert torch.equal(process.training_target(x0, eps, t), ddpm.training_target(x0, eps, t))


# --- process x schedule x rule ------------------------------------------------------------------------


def hand_built(name: str, config: SchedulerConfig, schedule: Schedule, **options):
    cls = SCHEDULERS[name]
    return cls.from_parts(NoiseProcess.from_config(config.filled_for(cls.DIFFUSERS_DEFAULTS)), schedule, **options)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_a_rule_over_a_hand_built_process_and_schedule_equals_create(name, spacing):
    config = SchedulerConfig(prediction_type="v_prediction")
    options = {"solver_order": 3} if name.startswith(("dpm", "unipc")) else {"eta": 0.5} if name == "ddim" else {}
    built = hand_built(name, config, Schedule(spacing, steps_offset=1), **options)
    created = create(name, config.with_values(timestep_spacing=spacing), **options)
    assert built.config == created.config and built.options == created.options
    assert torch.equal(run(built), run(created))
    assert torch.equal(built.timesteps, created.timesteps)
    # Its config and options describe it: the pipeline's rebuild of a template gives it again.
    rebuilt = type(built)(built.config, **dataclasses.asdict(built.options))
    assert torch.equal(run(rebuilt), run(created))


@pytest.mark.parametrize("name", SIGMA_RULES)
@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_a_hand_built_sigma_schedule_equals_the_option(name, kind):
    config = SchedulerConfig()
    built = hand_built(name, config, Schedule.from_config(config, kind))
    created = create(name, config, **{f"use_{kind}_sigmas": True})
    assert built.options == created.options and built.schedule == created.schedule
    assert torch.equal(run(built), run(created))
    assert not torch.equal(run(built), run(create(name, config)))


def test_from_parts_refuses_what_its_config_and_options_could_not_describe():
    config = SchedulerConfig()
    with pytest.raises(ConfigError, match="takes no karras sigmas"):
        hand_built("ddim", config, Schedule(sigma_schedule="karras"))
    with pytest.raises(ConfigError, match="Schedule\\(sigma_schedule"):
        hand_built("euler", config, Schedule(), use_karras_sigmas=True)
    with pytest.raises(ConfigError, match="pass them to set_timesteps"):
        hand_built("euler", config, Schedule().with_points(timesteps=[900, 10]))
    with pytest.raises(ConfigError, match="does not take option"):
        hand_built("euler", config, Schedule(), eta=0.3)


@pytest.mark.parametrize("name", NAMES)
def test_one_process_serves_several_schedulers_unchanged(name):
    config = SchedulerConfig().filled_for(SCHEDULERS[name].DIFFUSERS_DEFAULTS)
    process = NoiseProcess.from_config(config)
    before = process.alphas_cumprod.clone()
    first = SCHEDULERS[name].from_parts(process, Schedule.from_config(config))
    second = SCHEDULERS[name].from_parts(process, Schedule("trailing", 0))
    a, b = run(first), run(second)
    assert first.process is second.process and torch.equal(process.alphas_cumprod, before)
    if SCHEDULERS[name].SPACED:  # LCM's grid has no spacing: both schedules give it the same run
        assert not torch.equal(first.timesteps, second.timesteps) and not torch.equal(a, b)
