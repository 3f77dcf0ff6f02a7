"""The lcm sampler against diffusers' LCMScheduler on the same configs, and sampling known
distributions with their exact consistency model (support.analytic)."""

import diffusers
import numpy as np
import pytest
import torch

from ldm.errors import ConfigError, SettingError
from ldm.pipeline.stages import build_scheduler
from ldm.schedulers import SchedulerConfig, create, schedules
from ldm.settings import GenerationSettings
from support.analytic import GaussianMixture1D, distribution_error, run_sampler

# The released scheduler configs of SD 1.5 and SD 2.1 (verbatim): LCMScheduler fills the keys they
# leave out (timestep_spacing; SD 1.5's prediction_type) with its own defaults, as ldm's lcm must.
SD_CONFIGS = {
    "sd1": {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False,
    },
    "sd2": {
        "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    },
}
# Each config as released, with every key left out (LCMScheduler's defaults throughout), and with
# the schedule keys set to values LCM's grid must ignore.
VARIANTS = {
    "released": lambda config: config,
    "empty": lambda config: {},
    "spacing-set": lambda config: {**config, "timestep_spacing": "trailing", "steps_offset": 0},
}
GAUSSIAN = GaussianMixture1D.gaussian(0.5, 1.0)
MIXTURE = GaussianMixture1D((0.3, 0.7), (-1.5, 1.0), (0.3, 0.5))


def pair(config: dict, **options):
    """(ours, diffusers') lcm on one scheduler_config.json dict."""
    ours = create("lcm", SchedulerConfig.from_diffusers(config), **options)
    return ours, diffusers.LCMScheduler.from_config(config, **options)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.6 * torch.tanh(x) + 0.2 * x * (float(t) / 1000) - 0.05


# --- timesteps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(SD_CONFIGS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("original_steps", [50, 8, 20, 100, 1000])
def test_timesteps_equal_diffusers_for_every_step_count(model, variant, original_steps):
    ours, ref = pair(VARIANTS[variant](SD_CONFIGS[model]), original_inference_steps=original_steps)
    for steps in range(1, 9):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert ours.timesteps.tolist() == ref.timesteps.tolist(), steps
        assert ours.timesteps.dtype == torch.int64


def test_the_grid_is_n_of_the_distilled_timesteps():
    # 50 distilled timesteps 999, 979, ..., 19 (k = 20); 4 steps take indices 0, 12, 25, 37.
    assert schedules.skipped_timesteps(4, 1000, 50).tolist() == [999, 759, 499, 259]
    assert schedules.skipped_timesteps(1, 1000, 50).tolist() == [999]
    assert schedules.skipped_timesteps(50, 1000, 50).tolist() == list(range(999, 0, -20))
    with pytest.raises(ConfigError, match="at most original_inference_steps=8"):
        create("lcm", original_inference_steps=8).set_timesteps(9)
    with pytest.raises(ConfigError, match="original_inference_steps must be from 1 to 1000"):
        create("lcm", original_inference_steps=1001).set_timesteps(1)


def test_own_timesteps_are_used_as_diffusers_uses_them():
    ours, ref = pair(SD_CONFIGS["sd1"])
    ours.set_timesteps(timesteps=[999, 759, 499, 259])
    ref.set_timesteps(timesteps=[999, 759, 499, 259])
    assert ours.timesteps.tolist() == ref.timesteps.tolist() == [999, 759, 499, 259]
    with pytest.raises(ConfigError, match="pass timesteps"):
        ours.set_timesteps(sigmas=[10.0, 1.0, 0.0])


def test_options_are_checked():
    for bad in ({"original_inference_steps": 0}, {"original_inference_steps": 2.5}, {"timestep_scaling": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            create("lcm", **bad)
    with pytest.raises(ConfigError, match="does not take option"):
        create("lcm", use_karras_sigmas=True)


@pytest.mark.parametrize("original_steps", [8, 100])
def test_a_model_distilled_on_another_grid_says_so_in_its_scheduler_config_and_lcm_reads_it(original_steps):
    """An LCM model folder's scheduler_config.json names its grid (LCMScheduler's original_inference_steps): the
    same config gives diffusers' timesteps without the call saying it; a call's own option still overrides it."""
    config = {**SD_CONFIGS["sd1"], "_class_name": "LCMScheduler", "original_inference_steps": original_steps}
    for n in range(1, 9):
        ours, ref = pair(config)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
    read = SchedulerConfig.from_diffusers(config)
    assert SchedulerConfig.from_diffusers(read.to_diffusers()) == read  # kept through ldm's own folders and files
    overridden = create("lcm", read, original_inference_steps=50)
    overridden.set_timesteps(4)
    expected = create("lcm", SchedulerConfig.from_diffusers(SD_CONFIGS["sd1"]))
    expected.set_timesteps(4)
    assert overridden.timesteps.tolist() == expected.timesteps.tolist()
    with pytest.raises(ConfigError, match="original_inference_steps must be a whole number of at least 1"):
        SchedulerConfig.from_diffusers({**config, "original_inference_steps": 0})


def test_a_calls_timestep_spacing_is_refused_rather_than_ignored():
    config = SchedulerConfig.from_diffusers(SD_CONFIGS["sd1"])
    with pytest.raises(SettingError, match="timestep_spacing does not apply to scheduler lcm"):
        build_scheduler(config, GenerationSettings("", scheduler="lcm", timestep_spacing="trailing"), None)
    assert build_scheduler(config, GenerationSettings("", scheduler="lcm"), None).original_steps == 50


# --- the step ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(SD_CONFIGS))  # epsilon and v-prediction
@pytest.mark.parametrize("options", [{}, {"timestep_scaling": 2.0, "original_inference_steps": 25}])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_every_step_equals_diffusers_with_the_same_generator(model, options, steps):
    ours, ref = pair(SD_CONFIGS[model], **options)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mine, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in ref.timesteps:
        output = toy_model(x, t)
        want = ref.step(output, t, x, generator=theirs)
        got = ours.step(output, t, x, generator=mine)
        assert float((got - want.prev_sample).norm() / want.prev_sample.norm()) < 1e-6
        x = want.prev_sample  # each step from diffusers' state: a single-step comparison
    # Both drew noise after every step but the last, and nothing else.
    assert torch.equal(mine.get_state(), theirs.get_state())
    assert torch.equal(mine.get_state(), torch.Generator().manual_seed(5).get_state()) == (steps == 1)


def test_boundary_scalings_equal_diffusers_and_meet_the_boundary_condition():
    ours, ref = pair(SD_CONFIGS["sd1"], timestep_scaling=3.0)
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = ours.boundary_scalings(t)
        want = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert (c_skip, c_out) == pytest.approx((float(want[0]), float(want[1])), rel=1e-6, abs=1e-12)
    assert ours.boundary_scalings(0) == (1.0, 0.0)  # f(z, 0) = z (Song et al. 2023, eq. 5)


def test_clipping_follows_the_config_as_in_diffusers():
    config = {**SD_CONFIGS["sd1"], "clip_sample": True, "clip_sample_range": 0.5}
    ours, ref = pair(config)
    ours.set_timesteps(1)
    ref.set_timesteps(1)
    x = 3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = ref.timesteps[0]  # one step: no noise, f itself
    got, want = ours.step(toy_model(x, t), t, x), ref.step(toy_model(x, t), t, x).prev_sample
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6) and float(got.abs().max()) <= 0.5 + 1e-3


# --- known answers: a perfect consistency model ----------------------------------------------------------


@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_with_an_exact_consistency_model_any_step_count_samples_the_data(data, steps):
    scheduler = create("lcm", SchedulerConfig.from_diffusers(SD_CONFIGS["sd2"]))
    out = run_sampler(scheduler, data, steps, 8192, generator=torch.Generator().manual_seed(0), network="consistency")
    # One step maps stratified noise to the data quantiles (W1 near 0); more steps re-noise with
    # Monte-Carlo noise, whose W1 floor at 8192 samples is about 0.01.
    assert distribution_error(out, data) < (2e-3 if steps == 1 else 0.03)
    assert abs(float(out.std()) - data.std) < 0.03


def test_with_a_plain_denoiser_lcm_loses_variance():
    """Why LCM needs an LCM model (or LCM-LoRA): re-noising a denoiser's x_0 estimates shrinks the samples."""
    scheduler = create("lcm", SchedulerConfig.from_diffusers(SD_CONFIGS["sd1"]))
    out = run_sampler(scheduler, GAUSSIAN, 8, 8192, generator=torch.Generator().manual_seed(0))
    assert float(out.std()) < 0.9 * GAUSSIAN.std
    assert np.isfinite(out.numpy()).all()
