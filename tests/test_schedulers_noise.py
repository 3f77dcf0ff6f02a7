"""The shared noise-schedule math and SchedulerConfig, checked against diffusers and closed forms."""

import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm.errors import ConfigError
from ldm.schedulers import SchedulerConfig, create, noise

# The released files, verbatim: runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
SD15_SCHEDULER_JSON = """{
  "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
  "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
  "clip_sample": false
}"""
SD21_SCHEDULER_JSON = """{
  "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": false,
  "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null
}"""


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_equal_diffusers(schedule, zero_snr):
    start, end = (0.0001, 0.02) if schedule == "linear" else (0.00085, 0.012)
    ref = diffusers.DDIMScheduler(
        beta_start=start, beta_end=end, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr
    )
    betas = noise.betas_for(schedule, 1000, start, end)
    if zero_snr:
        betas = noise.rescale_zero_terminal_snr(betas)
    assert torch.equal(noise.alphas_cumprod(betas), ref.alphas_cumprod)


def test_zero_terminal_snr_rescaling_properties():
    betas = noise.betas_for("scaled_linear", 1000, 0.00085, 0.012)
    before, after = noise.alphas_cumprod(betas), noise.alphas_cumprod(noise.rescale_zero_terminal_snr(betas))
    assert float(after[-1]) == 0.0  # Lin et al. 2024: pure noise at t = T
    assert float(after[0]) == pytest.approx(float(before[0]), rel=1e-6)  # first step unchanged
    assert bool((after[1:] < after[:-1]).all())
    assert torch.allclose(noise.rescale_zero_terminal_snr(betas), diffusers_rescale(betas))


def test_scaled_linear_endpoints_are_sd_values():
    betas = noise.betas_for("scaled_linear", 1000, 0.00085, 0.012)
    assert float(betas[0]) == pytest.approx(0.00085, rel=1e-5)
    assert float(betas[-1]) == pytest.approx(0.012, rel=1e-5)
    assert float(noise.alphas_cumprod(betas)[-1]) == pytest.approx(0.0047, abs=1e-4)


def test_sigma_to_timestep_inverts_the_schedule():
    sigmas = noise.ve_sigmas(noise.alphas_cumprod(noise.betas_for("scaled_linear", 1000, 0.00085, 0.012)))
    log_sigmas = np.log(sigmas.numpy().astype(np.float64))
    t = np.array([0.0, 1.0, 17.0, 500.0, 998.0, 999.0])
    assert np.allclose(noise.sigma_to_timestep(sigmas.numpy()[t.astype(int)], log_sigmas), t, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_invert_the_targets(prediction_type):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    abar = torch.tensor([0.9, 0.3, 0.01], dtype=torch.float64).reshape(3, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + sigma * eps
    target = noise.prediction_from(x0, eps, alpha, sigma, prediction_type)
    got_x0, got_eps = noise.to_x0_and_eps(target, x_t, alpha, sigma, prediction_type)
    assert torch.allclose(got_x0, x0, atol=1e-10) and torch.allclose(got_eps, eps, atol=1e-10)


def test_v_is_the_velocity_of_salimans_and_ho():
    # v = d x_phi / d phi for x = cos(phi) x0 + sin(phi) eps (Salimans & Ho 2022, sec. 4).
    phi = torch.tensor(0.7, dtype=torch.float64)
    x0, eps = torch.tensor([1.5], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    v = noise.prediction_from(x0, eps, phi.cos(), phi.sin(), "v_prediction")
    assert torch.allclose(v, -phi.sin() * x0 + phi.cos() * eps)


def test_dynamic_thresholding_matches_diffusers():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    ref = diffusers.DDIMScheduler(thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9)
    assert torch.equal(noise.dynamic_threshold(x0, 0.9, 2.5), ref._threshold_sample(x0))
    small = torch.full((1, 4), 0.5)
    assert torch.equal(noise.dynamic_threshold(small, 0.995, 1.0), small)  # s clamps to 1: a no-op inside [-1, 1]


# Every key but the ones each released file sets is remembered as left out.
SD15_DEFAULTED = {
    "prediction_type", "timestep_spacing", "rescale_betas_zero_snr", "clip_sample_range",
    "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
}


def test_sd15_and_sd21_configs_read():
    sd15 = SchedulerConfig.from_diffusers(json.loads(SD15_SCHEDULER_JSON))
    assert sd15 == SchedulerConfig(defaulted=frozenset(SD15_DEFAULTED))
    sd21 = SchedulerConfig.from_diffusers(json.loads(SD21_SCHEDULER_JSON))
    assert sd21.prediction_type == "v_prediction" and sd21.steps_offset == 1
    assert sd21.defaulted == SD15_DEFAULTED - {"prediction_type"}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("ddpm", diffusers.DDPMScheduler),
        ("ddim", diffusers.DDIMScheduler),
        ("dpm-solver", diffusers.DPMSolverMultistepScheduler),
        ("dpm-solver++", diffusers.DPMSolverMultistepScheduler),
        ("dpm-solver++-sde", diffusers.DPMSolverMultistepScheduler),
        ("euler", diffusers.EulerDiscreteScheduler),
        ("euler-ancestral", diffusers.EulerAncestralDiscreteScheduler),
        ("unipc", diffusers.UniPCMultistepScheduler),
    ],
)
@pytest.mark.parametrize("released", [SD15_SCHEDULER_JSON, SD21_SCHEDULER_JSON])
def test_a_key_the_file_leaves_out_takes_the_chosen_samplers_diffusers_default(ours, theirs, released):
    """What diffusers' ``Sampler.from_config(pipe.scheduler.config)`` swap gives, key by key."""
    source = json.loads(released)
    loaded = getattr(diffusers, source["_class_name"]).from_config(source)  # as from_pretrained loads it
    reference = theirs.from_config(loaded.config)
    config = create(ours, SchedulerConfig.from_diffusers(source)).config
    for key in SchedulerConfig.from_diffusers(source).defaulted & reference.config.keys():
        assert getattr(config, key) == reference.config[key], key
    # The keys the diffusers class lacks are ones it never applies: it neither clips nor thresholds.
    assert not config.clip_sample or "clip_sample" in reference.config
    assert not config.thresholding or "thresholding" in reference.config
    assert config.defaulted == frozenset()
    assert config.timestep_spacing == reference.config.timestep_spacing
    assert (config.steps_offset, config.beta_start, config.beta_schedule) == (1, 0.00085, "scaled_linear")


def test_the_default_tables_are_the_diffusers_class_defaults():
    import inspect

    from ldm.schedulers.config import LCM_DEFAULTS, LEADING_DEFAULTS, LINSPACE_DEFAULTS

    lcm_parameters = inspect.signature(diffusers.LCMScheduler.__init__).parameters
    assert LCM_DEFAULTS.keys() <= lcm_parameters.keys()  # LCMScheduler has every key: none is left to chance
    for table, classes in (
        (LEADING_DEFAULTS, (diffusers.DDIMScheduler, diffusers.DDPMScheduler)),
        (LINSPACE_DEFAULTS, (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler,
                             diffusers.EulerDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler)),
        (LCM_DEFAULTS, (diffusers.LCMScheduler,)),
    ):
        for cls in classes:
            parameters = inspect.signature(cls.__init__).parameters
            for key in table.keys() & parameters.keys():
                assert parameters[key].default == table[key], (cls, key)
            assert "clip_sample" in parameters or table["clip_sample"] is False


def test_defaulted_keys_are_not_written_back_and_survive_a_round_trip():
    sd15 = SchedulerConfig.from_diffusers(json.loads(SD15_SCHEDULER_JSON))
    written = sd15.to_diffusers()
    assert not SD15_DEFAULTED & written.keys()
    assert SchedulerConfig.from_diffusers(written) == sd15
    assert create("dpm-solver++", SchedulerConfig.from_diffusers(written)).config.timestep_spacing == "linspace"


def test_values_set_later_and_diffusers_used_defaults_are_not_defaulted():
    sd15 = SchedulerConfig.from_diffusers(json.loads(SD15_SCHEDULER_JSON))
    trailing = sd15.with_values(timestep_spacing="trailing")
    assert "timestep_spacing" not in trailing.defaulted and "prediction_type" in trailing.defaulted
    assert create("euler", trailing).config.timestep_spacing == "trailing"
    # An in-memory diffusers config holds every key and lists the ones it defaulted.
    in_memory = dict(diffusers.PNDMScheduler.from_config(json.loads(SD15_SCHEDULER_JSON)).config)
    assert "timestep_spacing" in in_memory
    assert "timestep_spacing" in SchedulerConfig.from_diffusers(in_memory).defaulted
    release = SchedulerConfig.sd_release("v_prediction")
    assert release.prediction_type == "v_prediction" and release.defaulted == SD15_DEFAULTED - {"prediction_type"}
    with pytest.raises(ConfigError, match="defaulted"):
        SchedulerConfig(defaulted=frozenset({"karras_magic"}))


def test_config_roundtrips_through_diffusers():
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    assert SchedulerConfig.from_diffusers(cfg.to_diffusers()) == cfg
    ref = diffusers.DDIMScheduler.from_config(cfg.to_diffusers())
    assert ref.config.prediction_type == "v_prediction" and ref.config.rescale_betas_zero_snr
    assert json.loads(json.dumps(cfg.to_diffusers())) == cfg.to_diffusers()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("trained_betas", [0.1, 0.2], "trained_betas"),
        ("beta_schedule", "sigmoid", "beta_schedule"),
        ("prediction_type", "flow_prediction", "prediction_type"),
        ("karras_magic", 3, "unknown scheduler config key"),
        ("use_flow_sigmas", True, "use_flow_sigmas"),
    ],
)
def test_config_rejects_what_it_cannot_honour(key, value, message):
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig.from_diffusers({**json.loads(SD15_SCHEDULER_JSON), key: value})


def test_config_ignores_sampler_specific_keys():
    sampler_keys = {"solver_order": 3, "algorithm_type": "dpmsolver++", "use_karras_sigmas": True}
    cfg = {**json.loads(SD15_SCHEDULER_JSON), **sampler_keys}
    assert SchedulerConfig.from_diffusers(cfg) == SchedulerConfig(defaulted=frozenset(SD15_DEFAULTED))
