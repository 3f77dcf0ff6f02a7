"""One suite over every registered scheduler: the contract, options, reproducibility, and sampling
known distributions with their exact noise predictor (support.analytic)."""

import dataclasses

import pytest
import torch

from ldm.errors import ConfigError
from ldm.schedulers import SCHEDULERS, SchedulerConfig, create, noise
from support.analytic import GaussianMixture1D, abar_at, distribution_error, run_sampler

NAMES = list(SCHEDULERS)
STOCHASTIC = {"ddpm", "dpm-solver++-sde", "euler-ancestral", "lcm"}
# The exact network each sampler is made for (support.analytic.run_sampler): a diffusion model's
# denoiser, or for LCM a consistency model (with the exact denoiser its re-noised x_0 estimates
# lose variance at every step, as they would with any model that was not distilled for it).
NETWORK = {"lcm": "consistency"}
# What the error for a step count the grid cannot hold points to.
TOO_MANY_STEPS_HINT = {"lcm": "original_inference_steps"}
GAUSSIAN = GaussianMixture1D.gaussian(0.5, 1.0)
MIXTURE = GaussianMixture1D((0.3, 0.7), (-1.5, 1.0), (0.3, 0.5))
# Stated tolerances at 50 trailing steps (data std ~1), a few times the measured errors
# (docs/samplers.md); a wrong conversion, sigma or step index misses them by far.
MEAN_TOL, STD_TOL, W1_TOL = 0.03, 0.08, 0.06


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.6 * torch.tanh(x) + 0.2 * x * (float(t) / 1000) - 0.05


def sample_loop(scheduler, x, generator=None, start: int = 0):
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)
    return x


def latents(batch=2, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- registry and options ------------------------------------------------------------------------


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of ddpm, ddim, dpm-solver, dpm-solver\\+\\+"):
        create("k_lms")


@pytest.mark.parametrize("name", NAMES)
def test_an_option_the_scheduler_does_not_take_is_an_error(name):
    with pytest.raises(ConfigError, match="does not take option"):
        create(name, karras_magic=True)


def test_options_are_typed_per_scheduler():
    assert create("ddim", eta=0.5).options.eta == 0.5
    assert create("dpm-solver++", solver_order=3).options.solver_order == 3
    with pytest.raises(ConfigError, match="eta"):
        create("euler", eta=0.0)
    with pytest.raises(ConfigError, match="solver_order"):
        create("dpm-solver", solver_order=4)
    with pytest.raises(ConfigError, match="eta"):
        create("ddim", eta=-1.0)
    with pytest.raises(ConfigError, match="SchedulerConfig"):
        create("ddim", {"prediction_type": "epsilon"})


# --- the contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_contract(name, spacing):
    scheduler = create(name, SchedulerConfig(timestep_spacing=spacing))
    for steps in (1, 10, 50):
        scheduler.set_timesteps(steps)
        ts = scheduler.timesteps
        assert ts.ndim == 1 and len(ts) == steps
        assert bool((ts[1:] < ts[:-1]).all())
        assert 0 <= float(ts.min()) and float(ts.max()) <= 999
        # VP samplers start at std 1; Euler's VE state at sigma_max (below 1 only where a single
        # "linspace" step sits at t = 0, as in diffusers; test_euler_equals_diffusers compares it).
        assert isinstance(scheduler.init_noise_sigma, float) and scheduler.init_noise_sigma > 0
        assert scheduler.init_noise_sigma >= 1.0 or (name.startswith("euler") and steps == 1)


@pytest.mark.parametrize("name", NAMES)
def test_misuse_is_a_config_error(name):
    scheduler = create(name)
    with pytest.raises(ConfigError, match="set_timesteps"):
        scheduler.step(latents(), 981, latents())
    scheduler.set_timesteps(10)
    with pytest.raises(ConfigError, match="not in this scheduler's timesteps"):
        scheduler.step(latents(), 7, latents())
    with pytest.raises(ConfigError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ConfigError, match=TOO_MANY_STEPS_HINT.get(name, "trailing")):
        scheduler.set_timesteps(1000)  # SD's leading spacing with steps_offset=1 runs past t = 999


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_keeps_shape_and_dtype(name, dtype):
    scheduler = create(name)
    scheduler.set_timesteps(4)
    x = latents().to(dtype) * scheduler.init_noise_sigma
    out = sample_loop(scheduler, x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and bool(out.isfinite().all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_add_noise_scale_model_input_and_training_target_agree(name, prediction_type):
    scheduler = create(name, SchedulerConfig(prediction_type=prediction_type))
    scheduler.set_timesteps(10)
    x0, eps = latents(seed=1), latents(seed=2)
    t = scheduler.timesteps[3]
    model_input = scheduler.scale_model_input(scheduler.add_noise(x0, eps, t), t)
    abar = float(scheduler.alphas_cumprod[int(t)])
    alpha, sigma = abar**0.5, (1 - abar) ** 0.5
    assert torch.allclose(model_input, alpha * x0 + sigma * eps, atol=1e-5)  # the network sees the VP x_t
    target = scheduler.training_target(x0, eps, t)
    got_x0, got_eps = noise.to_x0_and_eps(target, model_input, alpha, sigma, prediction_type)
    assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm-solver++"])
def test_training_target_takes_one_timestep_per_batch_element(name):
    scheduler = create(name, SchedulerConfig(prediction_type="v_prediction"))
    x0, eps, t = latents(seed=1), latents(seed=2), torch.tensor([3, 900])
    noisy, target = scheduler.add_noise(x0, eps, t), scheduler.training_target(x0, eps, t)
    for i in range(2):
        assert torch.allclose(noisy[i : i + 1], scheduler.add_noise(x0[i : i + 1], eps[i : i + 1], t[i]))
        assert torch.allclose(target[i : i + 1], scheduler.training_target(x0[i : i + 1], eps[i : i + 1], t[i]))


# --- reproducibility ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_noise_comes_only_from_the_given_generator(name):
    scheduler = create(name, SchedulerConfig(prediction_type="v_prediction"))
    runs = []
    for global_seed, seed in ((1, 7), (2, 7), (3, 8)):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        scheduler.set_timesteps(6)  # and set_timesteps must reset all per-run state
        runs.append(sample_loop(scheduler, latents() * scheduler.init_noise_sigma, torch.Generator().manual_seed(seed)))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2]) == (name not in STOCHASTIC)


@pytest.mark.parametrize("name", NAMES)
def test_a_generator_list_draws_one_batch_element_from_each(name):
    scheduler = create(name)
    scheduler.set_timesteps(5)
    x = latents() * scheduler.init_noise_sigma
    together = sample_loop(scheduler, x, [torch.Generator().manual_seed(s) for s in (11, 12)])
    for i, seed in enumerate((11, 12)):
        scheduler.set_timesteps(5)
        alone = sample_loop(scheduler, x[i : i + 1], torch.Generator().manual_seed(seed))
        assert torch.allclose(together[i : i + 1], alone, atol=1e-6)


# --- img2img: starting mid-schedule ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_run_started_at_timesteps_k_is_the_tail_of_the_schedule(name):
    scheduler = create(name, SchedulerConfig(timestep_spacing="trailing"))
    # Multistep solvers keep history that a fresh start lacks: compare their single-step forms.
    options = {"solver_order": 1} if name.startswith("dpm-solver") else {}
    if name == "unipc":
        options = {"solver_order": 1, "disable_corrector": tuple(range(12))}
    single_step = create(name, SchedulerConfig(timestep_spacing="trailing"), **options)
    single_step.set_timesteps(12)
    x, states = latents() * single_step.init_noise_sigma, []
    for t in single_step.timesteps:  # a full deterministic run, recording the state before each step
        states.append(x)
        x = single_step.step(toy_model(single_step.scale_model_input(x, t), t), t, x)
    if name not in STOCHASTIC:
        single_step.set_timesteps(12)
        assert torch.allclose(sample_loop(single_step, states[5], start=5), x, atol=1e-5)
    # Any scheduler started at timesteps[k] from the exact marginal there samples the data.
    network = NETWORK.get(name, "denoiser")
    generator = torch.Generator().manual_seed(0)
    out = run_sampler(scheduler, GAUSSIAN, 50, 8192, start_index=20, generator=generator, network=network)
    assert abs(float(out.mean()) - GAUSSIAN.mean) < MEAN_TOL
    assert abs(float(out.std()) - GAUSSIAN.std) < STD_TOL


# --- closed form: sampling a known distribution with its exact predictor ----------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_samples_reproduce_the_data_distribution(name, data):
    scheduler = create(name, SchedulerConfig(timestep_spacing="trailing"))
    network = NETWORK.get(name, "denoiser")
    out = run_sampler(scheduler, data, 50, 8192, generator=torch.Generator().manual_seed(0), network=network)
    assert abs(float(out.mean()) - data.mean) < MEAN_TOL
    assert abs(float(out.std()) - data.std) < STD_TOL
    assert distribution_error(out, data) < W1_TOL


@pytest.mark.parametrize("name", NAMES)
def test_every_prediction_type_gives_the_same_samples(name):
    outs = []
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = create(name, SchedulerConfig(prediction_type=prediction_type))
        network = NETWORK.get(name, "denoiser")
        outs.append(run_sampler(scheduler, MIXTURE, 10, 512, generator=torch.Generator().manual_seed(0), network=network))
    assert torch.allclose(outs[0], outs[1], atol=1e-4) and torch.allclose(outs[0], outs[2], atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_zero_terminal_snr_v_prediction_samples_the_data(name):
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    scheduler = create(name, cfg)
    scheduler.set_timesteps(25)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    network = NETWORK.get(name, "denoiser")
    out = run_sampler(scheduler, GAUSSIAN, 25, 8192, generator=torch.Generator().manual_seed(0), network=network)
    assert bool(out.isfinite().all())
    assert abs(float(out.mean()) - GAUSSIAN.mean) < MEAN_TOL
    assert abs(float(out.std()) - GAUSSIAN.std) < 2 * STD_TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_eta_zero_is_first_order_dpm_solver(prediction_type):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing="trailing")
    ddim, dpm1 = create("ddim", cfg), create("dpm-solver", cfg, solver_order=1)
    ddim.set_timesteps(20)
    dpm1.set_timesteps(20)
    assert torch.equal(ddim.timesteps, dpm1.timesteps)
    x = latents()
    assert torch.allclose(sample_loop(ddim, x), sample_loop(dpm1, x), rtol=1e-4, atol=1e-5)
    # DPM-Solver++ of order 1 is DDIM too, up to its last step, which lands on sigma = 0.
    ddim.set_timesteps(20)
    plus1 = create("dpm-solver++", cfg, solver_order=1)
    plus1.set_timesteps(20)
    a, b = x.clone(), x.clone()
    for t in ddim.timesteps[:-1]:
        a = ddim.step(toy_model(a, t), t, a)
        b = plus1.step(toy_model(b, t), t, b)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_higher_orders_converge_faster():
    errors = {}
    for order in (1, 2, 3):
        for steps in (20, 50):
            scheduler = create("dpm-solver++", solver_order=order, use_karras_sigmas=True)
            errors[order, steps] = distribution_error(run_sampler(scheduler, GAUSSIAN, steps, 2048), GAUSSIAN)
    assert errors[3, 50] < errors[2, 50] < errors[1, 50]
    assert errors[3, 20] < errors[2, 20] < errors[1, 20]
    # The error falls faster with the step count at higher order.
    rates = [errors[o, 20] / errors[o, 50] for o in (1, 2, 3)]
    assert rates[0] < rates[1] < rates[2]


def test_dpm_solver_at_20_steps_beats_ddim_at_50():
    ddim = create("ddim", SchedulerConfig(timestep_spacing="trailing"))
    dpm = create("dpm-solver++", SchedulerConfig(timestep_spacing="trailing"), use_karras_sigmas=True)
    for data in (GAUSSIAN, MIXTURE):
        assert distribution_error(run_sampler(dpm, data, 20, 2048), data) < distribution_error(
            run_sampler(ddim, data, 50, 2048), data
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm-solver"])
def test_a_thousand_small_steps_are_nearly_exact(name):
    # Third-order DPM-Solver also covers the zero-length last step of this grid (t = 0 -> sigma(0)).
    options = {"solver_order": 3} if name == "dpm-solver" else {}
    scheduler = create(name, SchedulerConfig(timestep_spacing="trailing"), **options)
    out = run_sampler(scheduler, MIXTURE, 1000, 8192, generator=torch.Generator().manual_seed(0))
    assert abs(float(out.std()) - MIXTURE.std) < 0.01
    assert distribution_error(out, MIXTURE) < 0.02


def test_every_registered_scheduler_is_in_the_suite():
    assert set(NAMES) >= {"ddpm", "ddim", "dpm-solver", "dpm-solver++", "euler", "euler-ancestral", "unipc"}
    assert STOCHASTIC <= set(NAMES)
    for cls in SCHEDULERS.values():
        assert dataclasses.is_dataclass(cls.Options)


def test_abar_at_is_exact_at_integer_timesteps():
    scheduler = create("ddim")
    for t in (0, 1, 500, 999):
        exact = float(scheduler.alphas_cumprod[t])
        assert float(abar_at(scheduler.alphas_cumprod, t)) == pytest.approx(exact, rel=1e-6)


# --- closed form: DDIM steps with the exact noise predictor of Gaussian data --------------------------------

NARROW = GaussianMixture1D.gaussian(0.5, 0.5)  # variance 1/4: the marginal variance changes with t
LEADING_10 = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]  # SD's 10 "leading" steps, steps_offset=1


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's abar_t in float64, apart from ldm.schedulers.noise: sqrt(beta) linear from 0.00085 to 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def ddim_abars(final: float | None = None) -> list[float]:
    """abar at each of the 10 timesteps, then where the last step lands (abar_0 unless ``final``)."""
    abar = sd_alphas_cumprod()
    return [float(abar[t]) for t in LEADING_10] + [float(abar[0]) if final is None else final]


def ddim_coefficients(abar_t: float, abar_prev: float, eta: float) -> tuple[float, float, float]:
    """(sqrt(abar_prev), direction coefficient, sigma) of Song et al. 2021, eq. 12, sigma from eq. 16 times eta."""
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    return abar_prev**0.5, (1 - abar_prev - sigma**2) ** 0.5, sigma


@pytest.mark.parametrize(
    "name, options, final", [("ddim", {"eta": 0.0}, None), ("ddim", {"eta": 1.0}, None), ("ddpm", {}, 1.0)]
)
def test_every_ddim_step_is_eq_12_of_song_et_al(name, options, final):
    eta = options.get("eta", 1.0)  # DDPM is DDIM at eta = 1, landing on abar = 1
    abars = ddim_abars(final)
    x = torch.linspace(-3, 3, 64).reshape(4, 16)
    for k, t in enumerate(LEADING_10):
        scheduler = create(name, **options)
        scheduler.set_timesteps(10)
        assert scheduler.timesteps.tolist() == LEADING_10
        eps = NARROW.predict(x, abars[k], "epsilon")
        got = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(k))
        # x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z, in float64.
        x0_hat = (x.double() - (1 - abars[k]) ** 0.5 * eps.double()) / abars[k] ** 0.5
        scale, direction, sigma = ddim_coefficients(abars[k], abars[k + 1], eta)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(k)).double()  # the step's draw
        expected = scale * x0_hat + direction * eps.double() + sigma * z
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-6)  # float32 steps: measured 1.5e-6


def ddim_output_law(data: GaussianMixture1D, abars: list[float], eta: float) -> tuple[float, float]:
    """(mean, variance) of a DDIM run with the exact predictor, from the marginal at abars[0], in closed form.

    For Gaussian data N(m, s^2) both x0_hat = m + g (x - a m), g = a s^2 / (a^2 s^2 + 1 - a^2), and eps_hat
    are linear in x, so each step is x_prev = A x + B + sigma z and the law stays Gaussian.
    """
    m, s2 = data.mean, data.std**2
    mean, var = abars[0] ** 0.5 * m, abars[0] * s2 + 1 - abars[0]
    for abar_t, abar_prev in zip(abars, abars[1:]):
        a, b = abar_t**0.5, (1 - abar_t) ** 0.5
        g = a * s2 / (abar_t * s2 + 1 - abar_t)
        scale, direction, sigma = ddim_coefficients(abar_t, abar_prev, eta)
        slope = scale * g + direction * (1 - a * g) / b
        offset = (m - g * a * m) * (scale - direction * a / b)
        mean, var = slope * mean + offset, slope**2 * var + sigma**2
    return mean, var


def test_a_full_ddim_run_at_eta_1_has_the_closed_form_output_law():
    count = 2**16
    out = run_sampler(create("ddim", eta=1.0), NARROW, 10, count, generator=torch.Generator().manual_seed(0))
    mean, var = ddim_output_law(NARROW, ddim_abars(), eta=1.0)
    # Only the sampler's noise is random (the start is stratified): 4 standard errors of a Gaussian sample.
    assert abs(float(out.mean()) - mean) < 4 * (var / count) ** 0.5
    assert abs(float(out.var()) - var) < 4 * var * (2 / count) ** 0.5
