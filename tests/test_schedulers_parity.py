"""Whole trajectories of ldm schedulers against diffusers' on identical configs and a fixed toy model."""

import diffusers
import pytest
import torch

from ldm.errors import ConfigError
from ldm.schedulers import SchedulerConfig, create, from_diffusers_scheduler

STEPS = [5, 12, 25]


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'network' whose output depends on x and t."""
    return 0.6 * torch.tanh(x) + 0.2 * x * (float(t) / 1000) - 0.05


def start_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run(scheduler, x: torch.Tensor, step, seed: int | None = None) -> torch.Tensor:
    """The denoising loop from the initial state ``x`` (already scaled by init_noise_sigma)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = step(toy_model(scheduler.scale_model_input(x, t), t), t, x, generator)
    return x


def assert_trajectories_agree(ours, ref, seed: int | None = None, rel: float = 1e-6):
    # Both start from the same state; init_noise_sigma is compared separately (test_euler_...).
    x = start_latents() * ours.init_noise_sigma
    got = run(ours, x, lambda out, t, x, g: ours.step(out, t, x, generator=g), seed)
    if seed is None:  # deterministic diffusers schedulers such as UniPC take no generator
        want = run(ref, x, lambda out, t, x, g: ref.step(out, t, x).prev_sample)
    else:
        want = run(ref, x, lambda out, t, x, g: ref.step(out, t, x, generator=g).prev_sample, seed)
    assert float((got - want).norm() / want.norm()) < rel


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", STEPS + [50])
def test_ddim_equals_diffusers(prediction_type, spacing, steps):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    ours, ref = create("ddim", cfg), diffusers.DDIMScheduler.from_config(cfg.to_diffusers())
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    if 1000 % steps == 0:  # otherwise diffusers' DDIM steps off the grid (see ddim.py)
        assert_trajectories_agree(ours, ref)


def test_ddim_zero_snr_trailing_equals_diffusers():
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    ours, ref = create("ddim", cfg), diffusers.DDIMScheduler.from_config(cfg.to_diffusers())
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    assert_trajectories_agree(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["dpm-solver", "dpm-solver++"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", STEPS)
def test_dpm_solver_equals_diffusers(prediction_type, name, order, spacing, steps):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    data_prediction = name == "dpm-solver++"
    ours = create(name, cfg, solver_order=order)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        cfg.to_diffusers(),
        algorithm_type="dpmsolver++" if data_prediction else "dpmsolver",
        solver_order=order,
        final_sigmas_type="zero" if data_prediction else "sigma_min",
    )
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_trajectories_agree(ours, ref)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_solver_plus_plus_variants_equal_diffusers(solver_type, karras):
    cfg = SchedulerConfig(prediction_type="v_prediction")
    ours = create("dpm-solver++", cfg, solver_type=solver_type, use_karras_sigmas=karras)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        cfg.to_diffusers(), solver_type=solver_type, use_karras_sigmas=karras
    )
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_trajectories_agree(ours, ref)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_sde_dpm_solver_plus_plus_equals_diffusers_with_the_same_generator(order):
    cfg = SchedulerConfig()
    ours = create("dpm-solver++-sde", cfg, solver_order=order)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        cfg.to_diffusers(), algorithm_type="sde-dpmsolver++", solver_order=order
    )
    ours.set_timesteps(15)
    ref.set_timesteps(15)
    assert_trajectories_agree(ours, ref, seed=3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_equals_diffusers(prediction_type, spacing, karras):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    ours = create("euler", cfg, use_karras_sigmas=karras)
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg.to_diffusers(), use_karras_sigmas=karras)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    assert torch.allclose(ours.timesteps, ref.timesteps, rtol=1e-6)
    # sigma_max for "linspace" and "trailing", sqrt(sigma_max^2 + 1) for "leading", as diffusers.
    sigma_max = float(ours.sigmas.max())
    expected = (sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max
    assert ours.init_noise_sigma == pytest.approx(expected, rel=1e-6)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert_trajectories_agree(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_unipc_equals_diffusers(prediction_type, order, solver_type, spacing):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    ours = create("unipc", cfg, solver_order=order, solver_type=solver_type)
    ref = diffusers.UniPCMultistepScheduler.from_config(cfg.to_diffusers(), solver_order=order, solver_type=solver_type)
    for steps in (6, 20):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert torch.equal(ours.timesteps, ref.timesteps)
        if solver_type == "bh2":
            assert_trajectories_agree(ours, ref)
            continue
        # diffusers' bh1 multiplies B(h) = -inf by a zero residual on the last step to sigma = 0
        # and returns NaN; every step before it must agree, and ours ends finite.
        x = y = start_latents()
        for t in ours.timesteps[:-1]:
            x, y = ours.step(toy_model(x, t), t, x), ref.step(toy_model(y, t), t, y).prev_sample
        assert float((x - y).norm() / y.norm()) < 1e-6
        last = ours.timesteps[-1]
        assert bool(ours.step(toy_model(x, last), last, x).isfinite().all())


def test_unipc_karras_and_disabled_corrector_equal_diffusers():
    cfg = SchedulerConfig(prediction_type="v_prediction")
    ours = create("unipc", cfg, use_karras_sigmas=True, disable_corrector=(0, 3))
    ref = diffusers.UniPCMultistepScheduler.from_config(
        cfg.to_diffusers(), use_karras_sigmas=True, disable_corrector=[0, 3]
    )
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_trajectories_agree(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stochastic_schedulers_equal_diffusers_with_the_same_generator(prediction_type):
    cfg = SchedulerConfig(prediction_type=prediction_type)
    pairs = [
        (create("ddpm", cfg), diffusers.DDPMScheduler.from_config(cfg.to_diffusers())),
        (create("euler-ancestral", cfg), diffusers.EulerAncestralDiscreteScheduler.from_config(cfg.to_diffusers())),
    ]
    for ours, ref in pairs:
        ours.set_timesteps(20)
        ref.set_timesteps(20)
        assert torch.equal(ours.timesteps.float(), ref.timesteps.float())
        assert_trajectories_agree(ours, ref, seed=5)


def test_ddim_with_eta_equals_diffusers_with_the_same_generator():
    cfg = SchedulerConfig()
    ours, ref = create("ddim", cfg, eta=0.7), diffusers.DDIMScheduler.from_config(cfg.to_diffusers())
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x = start_latents()  # init_noise_sigma is 1 for both
    got = run(ours, x, lambda out, t, x, g: ours.step(out, t, x, generator=g), seed=9)
    want = run(ref, x, lambda out, t, x, g: ref.step(out, t, x, eta=0.7, generator=g).prev_sample, seed=9)
    assert float((got - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("make", [diffusers.DDIMScheduler, diffusers.HeunDiscreteScheduler, diffusers.PNDMScheduler])
def test_adapter_runs_diffusers_schedulers_through_our_contract(make):
    ref = make.from_config(SchedulerConfig().to_diffusers())
    wrapped = from_diffusers_scheduler(make.from_config(SchedulerConfig().to_diffusers()))
    wrapped.set_timesteps(10)
    ref.set_timesteps(10)
    assert torch.equal(wrapped.timesteps, ref.timesteps)
    assert wrapped.init_noise_sigma == float(ref.init_noise_sigma)
    x = start_latents() * wrapped.init_noise_sigma
    got = run(wrapped, x, lambda out, t, x, g: wrapped.step(out, t, x, generator=g), seed=1)
    want = run(ref, x, lambda out, t, x, g: ref.step(out, t, x).prev_sample)
    assert torch.equal(got, want)
    x0, eps, t = start_latents(1), start_latents(2), torch.tensor([10, 700])
    assert torch.equal(wrapped.training_target(x0, eps, t), eps)
    if make is not diffusers.HeunDiscreteScheduler:  # Heun's state is VE-scaled like our Euler
        assert torch.allclose(wrapped.add_noise(x0, eps, t), create("ddim").add_noise(x0, eps, t))


def test_adapter_passes_the_generator_to_stochastic_diffusers_schedulers():
    cfg = SchedulerConfig().to_diffusers()
    wrapped = from_diffusers_scheduler(diffusers.EulerAncestralDiscreteScheduler.from_config(cfg))
    ours = create("euler-ancestral")
    wrapped.set_timesteps(8)
    ours.set_timesteps(8)
    x = start_latents() * ours.init_noise_sigma
    got = run(wrapped, x, lambda out, t, x, g: wrapped.step(out, t, x, generator=g), seed=4)
    want = run(ours, x, lambda out, t, x, g: ours.step(out, t, x, generator=g), seed=4)
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_adapter_refuses_what_is_not_a_ddpm_type_diffusers_scheduler():
    with pytest.raises(ConfigError, match="not a diffusers scheduler"):
        from_diffusers_scheduler(create("ddim"))
    with pytest.raises(ConfigError, match="alphas_cumprod"):
        from_diffusers_scheduler(diffusers.FlowMatchEulerDiscreteScheduler())


# --- exponential sigmas and the caller's own timesteps / sigmas ----------------------------------------

# Our sampler, the diffusers class and options it equals, for the classes with use_exponential_sigmas.
EXPONENTIAL = {
    "dpm-solver++": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpm-solver++-sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(EXPONENTIAL))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [8, 25])
def test_exponential_sigmas_equal_diffusers(prediction_type, name, spacing, steps):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    make, options = EXPONENTIAL[name]
    ours = create(name, cfg, use_exponential_sigmas=True)
    ref = make.from_config(cfg.to_diffusers(), use_exponential_sigmas=True, **options)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype))
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6)
    assert_trajectories_agree(ours, ref, seed=2 if name.endswith("sde") else None)


def test_exponential_sigmas_differ_from_karras_and_spaced_ones():
    grids = {}
    for options in ({}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}):
        scheduler = create("euler", **options)
        scheduler.set_timesteps(10)
        grids[tuple(options)] = scheduler.sigmas
    spaced, karras, exponential = grids.values()
    assert not torch.allclose(exponential, karras, rtol=1e-3) and not torch.allclose(exponential, spaced, rtol=1e-3)


OWN_TIMESTEPS = [999, 850, 700, 520, 400, 260, 130, 41, 7]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_own_timesteps_equal_diffusers_ddpm_with_the_same_generator(prediction_type):
    cfg = SchedulerConfig(prediction_type=prediction_type)
    ours, ref = create("ddpm", cfg), diffusers.DDPMScheduler.from_config(cfg.to_diffusers())
    ours.set_timesteps(timesteps=OWN_TIMESTEPS)
    ref.set_timesteps(timesteps=OWN_TIMESTEPS)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_trajectories_agree(ours, ref, seed=6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", ["dpm-solver", "dpm-solver++"])
def test_own_timesteps_equal_diffusers_dpm_solver(prediction_type, order, name):
    cfg = SchedulerConfig(prediction_type=prediction_type)
    data_prediction = name == "dpm-solver++"
    ours = create(name, cfg, solver_order=order)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        cfg.to_diffusers(),
        algorithm_type="dpmsolver++" if data_prediction else "dpmsolver",
        solver_order=order,
        final_sigmas_type="zero" if data_prediction else "sigma_min",
    )
    ours.set_timesteps(timesteps=OWN_TIMESTEPS)
    ref.set_timesteps(timesteps=OWN_TIMESTEPS)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6)
    assert_trajectories_agree(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_own_timesteps_and_sigmas_equal_diffusers_euler(prediction_type, spacing):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    own_sigmas = [14.0, 6.5, 2.9, 1.2, 0.45, 0.15, 0.05, 0.0]
    for points in ({"timesteps": [999.0, 800.5, 640.0, 300.25, 120.0, 9.0]}, {"sigmas": own_sigmas}):
        ours, ref = create("euler", cfg), diffusers.EulerDiscreteScheduler.from_config(cfg.to_diffusers())
        ours.set_timesteps(**points)
        ref.set_timesteps(**points)
        assert torch.allclose(ours.timesteps, ref.timesteps, rtol=1e-6)
        assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        assert_trajectories_agree(ours, ref)


def test_adapter_passes_own_points_to_diffusers_classes_that_take_them():
    cfg = SchedulerConfig().to_diffusers()
    wrapped = from_diffusers_scheduler(diffusers.EulerDiscreteScheduler.from_config(cfg))
    ours = create("euler")
    sigmas = [14.0, 3.0, 0.7, 0.1, 0.0]
    wrapped.set_timesteps(sigmas=sigmas)
    ours.set_timesteps(4, sigmas=sigmas)  # a step count beside the points must agree with them
    assert torch.allclose(wrapped.timesteps, ours.timesteps, rtol=1e-6)
    x = start_latents() * ours.init_noise_sigma
    got = run(wrapped, x, lambda out, t, x, g: wrapped.step(out, t, x, generator=g))
    want = run(ours, x, lambda out, t, x, g: ours.step(out, t, x, generator=g))
    assert float((got - want).norm() / want.norm()) < 1e-6
    with pytest.raises(ConfigError, match="DDIMScheduler.set_timesteps takes no timesteps"):
        from_diffusers_scheduler(diffusers.DDIMScheduler.from_config(cfg)).set_timesteps(timesteps=[900, 10])
    with pytest.raises(ConfigError, match="DDPMScheduler: .*descending"):
        from_diffusers_scheduler(diffusers.DDPMScheduler.from_config(cfg)).set_timesteps(timesteps=[10, 900])
    with pytest.raises(ConfigError, match="num_inference_steps=3 but 4 steps"):
        wrapped.set_timesteps(3, sigmas=sigmas)
