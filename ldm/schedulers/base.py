"""The scheduler contract: ``SchedulerConfig`` (the trained noise process) and ``Scheduler``.

A scheduler is built from a config that describes how the model was trained (beta schedule,
prediction type, ...) plus typed options of its own sampling algorithm (``eta`` for DDIM,
``solver_order`` for DPM-Solver, ...). Every scheduler honours the same contract:

    set_timesteps(n, device=None)   reset per-run state and choose n timesteps
    timesteps                       1-D, descending, on ``device``
    init_noise_sigma                std of the starting noise (1.0 unless the state is VE-scaled)
    scale_model_input(x, t)         what the network sees at t (identity unless VE-scaled)
    step(model_output, t, x, generator=None) -> x_prev
    add_noise(x0, noise, t)         the forward process, in the scheduler's own state scaling
    training_target(x0, noise, t)   eps / v / x0 per ``config.prediction_type``

The step index is looked up from ``t`` on the first ``step`` after ``set_timesteps``, so a run may
start at ``timesteps[k]`` (img2img) and then continues in order.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, get_args

import torch

from ldm.errors import ConfigError
from ldm.schedulers import noise
from ldm.schedulers.noise import BetaSchedule, PredictionType, TimestepSpacing

# Keys of diffusers' scheduler_config.json that configure one diffusers sampler class rather than
# the trained noise process; reading a config ignores them (our schedulers take typed options).
DIFFUSERS_SAMPLER_KEYS = frozenset(
    {
        "algorithm_type", "corrector_order", "disable_corrector", "euler_at_final", "final_sigmas_type",
        "interpolation_type", "lambda_min_clipped", "lower_order_final", "predict_x0", "predictor_order",
        "set_alpha_to_one", "skip_prk_steps", "solver_order", "solver_p", "solver_type", "timestep_type",
        "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "variance_type",
        "sigma_min", "sigma_max", "original_inference_steps", "timestep_scaling", "noise_sampler_seed",
    }
)
# Keys that would change the noise process in ways we do not model: accepted only at these values.
DIFFUSERS_NEUTRAL_VALUES: dict[str, Any] = {
    "trained_betas": None,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "flow_shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
}

# diffusers' own defaults of the noise-process keys, per sampler class. diffusers' ``from_config``
# gives each key that the model's scheduler_config.json left out the default of the class being
# built (configuration_utils.py, ``_use_default_values``), so the same SD 1.5 model samples on
# "leading" timesteps with DDIM and DDPM and on "linspace" ones with DPM-Solver, Euler and UniPC.
_DIFFUSERS_COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
# DDIMScheduler, DDPMScheduler.
LEADING_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {**_DIFFUSERS_COMMON_DEFAULTS, "timestep_spacing": "leading", "clip_sample": True}
)
# DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler and
# EulerAncestralDiscreteScheduler, which have no clip_sample key: they never clip.
LINSPACE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {**_DIFFUSERS_COMMON_DEFAULTS, "timestep_spacing": "linspace", "clip_sample": False}
)
# The keys that SD's released scheduler configs set (SD 1.5's PNDM, SD 2.x's DDIM); a single-file
# checkpoint carries no scheduler config, so ldm assumes these and leaves the rest to each sampler,
# as diffusers' ``from_single_file`` does with the released config.
SD_RELEASE_KEYS = frozenset(
    {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset", "clip_sample", "prediction_type"}
)


@dataclass(frozen=True)
class SchedulerConfig:
    """How the model was trained; shared by every scheduler. Defaults are Stable Diffusion's."""

    num_train_timesteps: int = 1000  # T, length of the training noise schedule
    beta_start: float = 0.00085  # beta_1
    beta_end: float = 0.012  # beta_T
    beta_schedule: BetaSchedule = "scaled_linear"
    prediction_type: PredictionType = "epsilon"  # what the network outputs
    timestep_spacing: TimestepSpacing = "leading"  # how inference timesteps are picked (Lin et al. 2024)
    steps_offset: int = 1  # added to "leading" timesteps; SD uses 1
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024, Alg. 1 (needs a v-prediction model)
    clip_sample: bool = False  # clip predicted x_0 to +-clip_sample_range (pixel-space models)
    clip_sample_range: float = 1.0
    thresholding: bool = False  # dynamic thresholding of predicted x_0 (Saharia et al. 2022)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # Keys the model's scheduler_config.json left out: each sampler fills them with its own
    # diffusers class's default (``filled_for``), and ``to_diffusers`` does not write them.
    defaulted: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for field, kind in (
            ("beta_schedule", BetaSchedule),
            ("prediction_type", PredictionType),
            ("timestep_spacing", TimestepSpacing),
        ):
            value, choices = getattr(self, field), get_args(kind)
            if value not in choices:
                raise ConfigError(f"scheduler {field} {value!r} is not supported; choose one of {', '.join(choices)}")
        if self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")
        if self.steps_offset < 0:
            raise ConfigError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ConfigError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        unknown = set(self.defaulted) - set(_process_keys())
        if unknown:
            raise ConfigError(f"defaulted names unknown scheduler config key(s) {', '.join(sorted(unknown))}")

    @classmethod
    def sd_release(cls, prediction_type: PredictionType = "epsilon") -> SchedulerConfig:
        """The config a single-file SD checkpoint implies: SD's released keys set, the rest defaulted."""
        return cls(prediction_type=prediction_type, defaulted=frozenset(_process_keys()) - SD_RELEASE_KEYS)

    def filled_for(self, defaults: Mapping[str, Any]) -> SchedulerConfig:
        """This config with each defaulted key set to ``defaults[key]``, a sampler's own default."""
        if not self.defaulted:
            return self
        return dataclasses.replace(self, defaulted=frozenset(), **{key: defaults[key] for key in self.defaulted})

    def with_values(self, **values: Any) -> SchedulerConfig:
        """This config with ``values`` set as if the model's file had them (no longer defaulted)."""
        return dataclasses.replace(self, defaulted=self.defaulted - values.keys(), **values)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> SchedulerConfig:
        """Read a diffusers ``scheduler_config.json`` dict of any SD scheduler class.

        Keys starting with "_" and sampler-specific keys are ignored; keys that would change the
        noise process to one we do not model must hold their neutral value; anything else unknown
        is a ConfigError. Keys the dict leaves out, or lists in diffusers' ``_use_default_values``
        (an in-memory diffusers config), are remembered as ``defaulted``.
        """
        ours = set(_process_keys())
        used_defaults = set(config.get("_use_default_values", ()))
        values = {}
        for key, value in config.items():
            if key in ours:
                if key not in used_defaults:
                    values[key] = value
            elif key.startswith("_") or key in DIFFUSERS_SAMPLER_KEYS:
                continue
            elif key in DIFFUSERS_NEUTRAL_VALUES:
                if value != DIFFUSERS_NEUTRAL_VALUES[key]:
                    raise ConfigError(
                        f"scheduler config sets {key}={value!r}, which ldm does not support; "
                        f"remove it or set it to {DIFFUSERS_NEUTRAL_VALUES[key]!r}"
                    )
            else:
                raise ConfigError(f"unknown scheduler config key {key!r}; remove it from scheduler_config.json")
        return cls(**values, defaulted=frozenset(ours - values.keys()))

    def to_diffusers(self) -> dict[str, Any]:
        """A scheduler_config.json dict; any diffusers SD scheduler loads it with ``from_config``.

        Defaulted keys are left out, as the model's own file left them out, so each diffusers
        sampler fills them with its own default as ldm's do. ``set_alpha_to_one=False`` and
        ``trained_betas=None`` are written out because that is how the SD checkpoints' configs
        state the conventions ldm's DDIM follows.
        """
        values = {key: getattr(self, key) for key in _process_keys() if key not in self.defaulted}
        return {
            **dict(sorted(values.items())),
            "set_alpha_to_one": False,
            "trained_betas": None,
            "_class_name": "DDIMScheduler",
        }


def _process_keys() -> tuple[str, ...]:
    """The noise-process keys of ``SchedulerConfig`` (every field but ``defaulted``)."""
    return tuple(f.name for f in dataclasses.fields(SchedulerConfig) if f.name != "defaulted")


@dataclass(frozen=True)
class NoOptions:
    """A scheduler without options of its own."""


class Scheduler(abc.ABC):
    """Shared state and the parts of the contract that do not depend on the sampling algorithm.

    Subclasses set ``Options`` (a frozen dataclass of their typed options) and, where their diffusers
    class's defaults are not ``LINSPACE_DEFAULTS``, ``DIFFUSERS_DEFAULTS``; they implement
    ``set_timesteps`` and ``step``.
    """

    Options: ClassVar[type] = NoOptions
    # The defaults of this sampler's diffusers class, for keys the model's config left out.
    DIFFUSERS_DEFAULTS: ClassVar[Mapping[str, Any]] = LINSPACE_DEFAULTS

    def __init__(self, config: SchedulerConfig | None = None, **options: Any) -> None:
        config = config if config is not None else SchedulerConfig()
        if not isinstance(config, SchedulerConfig):
            raise ConfigError(f"expected a SchedulerConfig, got {type(config).__name__}")
        self.config = config.filled_for(self.DIFFUSERS_DEFAULTS)
        self.options = build_options(type(self), options)
        c = self.config
        betas = noise.betas_for(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end)
        if c.rescale_betas_zero_snr:
            betas = noise.rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = noise.alphas_cumprod(betas)
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self.num_inference_steps = 0
        self._step_index: int | None = None

    # --- contract parts with a common definition ------------------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        return sample

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
        alpha_t, sigma_t = self._vp_coefficients(t, x0)
        return alpha_t * x0 + sigma_t * eps

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The regression target of a network of ``config.prediction_type`` at (x0, eps, t)."""
        alpha_t, sigma_t = self._vp_coefficients(t, x0)
        return noise.prediction_from(x0, eps, alpha_t, sigma_t, self.config.prediction_type)

    @abc.abstractmethod
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the inference timesteps and reset the per-run state."""

    @abc.abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """One denoising step from ``sample`` at ``t`` to the previous sample."""

    # --- helpers for subclasses -----------------------------------------------------------------

    def _check_steps(self, num_inference_steps: int) -> None:
        limit = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= limit:
            raise ConfigError(f"num_inference_steps must be an integer from 1 to {limit}, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self._step_index = None

    def _checked_grid(self, timesteps: torch.Tensor, *, strict: bool = True) -> torch.Tensor:
        """``timesteps`` if they lie in [0, T) and decrease (strictly unless ``strict`` is False, as
        rounded Karras grids may repeat a timestep); "leading" spacing breaks this at step counts
        close to T, as it does in diffusers."""
        c = self.config
        inside = bool((timesteps >= 0).all() and (timesteps <= c.num_train_timesteps - 1).all())
        steps = timesteps[:-1] - timesteps[1:]
        ordered = bool((steps > 0).all()) if strict else bool((steps >= 0).all() and timesteps[0] > timesteps[-1])
        if not (inside and ordered):
            raise ConfigError(
                f"{self.num_inference_steps} steps do not fit {c.num_train_timesteps} training timesteps with "
                f"{c.timestep_spacing!r} spacing and steps_offset={c.steps_offset}; use fewer steps or "
                "trailing spacing (ldm txt2img --timestep-spacing trailing; timestep_spacing='trailing' in Python)"
            )
        return timesteps

    def _index_for_step(self, t: torch.Tensor | int | float) -> int:
        """Index of the current step: found from t on the first step of a run, then counted."""
        if self.num_inference_steps == 0:
            raise ConfigError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            matches = torch.isclose(self.timesteps.double().cpu(), torch.tensor(value, dtype=torch.float64))
            hits = matches.nonzero().flatten()
            if hits.numel() == 0:
                raise ConfigError(f"timestep {value:g} is not in this scheduler's timesteps; pass one of .timesteps")
            self._step_index = int(hits[0])
        if self._step_index >= len(self.timesteps):
            raise ConfigError("step() called after the last timestep; call set_timesteps again for a new run")
        return self._step_index

    def _begin_step(self, t: torch.Tensor | int | float) -> int:
        """The index of the step ``step(..., t, ...)`` is taking; the next call takes the one after it."""
        i = self._index_for_step(t)
        self._step_index = i + 1
        return i

    def _vp_coefficients(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast against ``like``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        abar = self.alphas_cumprod[t.long()].to(device=like.device, dtype=like.dtype)
        abar = noise.broadcast_to(abar, like) if abar.ndim > 0 else abar
        return abar**0.5, (1 - abar) ** 0.5

    def _process_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Optional dynamic thresholding or static clipping of the predicted x_0."""
        c = self.config
        if c.thresholding:
            return noise.dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        if c.clip_sample:
            return noise.clip_x0(x0, c.clip_sample_range)
        return x0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, {self.options})"


def build_options(cls: type[Scheduler], options: dict[str, Any]) -> Any:
    """``cls.Options(**options)``, with options the scheduler does not take as a ConfigError."""
    accepted = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ConfigError(f"{cls.__name__} does not take option(s) {', '.join(unknown)}; it takes {takes}")
    return cls.Options(**options)
