"""``SchedulerConfig``: how a model was trained, as its ``scheduler_config.json`` says.

One config serves every sampler. It holds the trained noise process (beta schedule, prediction
type, zero-terminal-SNR rescaling, x_0 clipping) and the two keys diffusers keeps beside it that
choose a run's timesteps (``timestep_spacing``, ``steps_offset``). ``NoiseProcess``
(``process.py``) is built from the first part, ``Schedule`` (``schedules.py``) from the second.
Keys a model's file leaves out are filled per sampler with its diffusers class's defaults
(``filled_for``), as diffusers' ``from_config`` fills them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, get_args

from ldm.errors import ConfigError
from ldm.schedulers.noise import BetaSchedule, PredictionType, TimestepSpacing

# Keys of diffusers' scheduler_config.json that configure one diffusers sampler class rather than
# the trained noise process; reading a config ignores them (our schedulers take typed options).
DIFFUSERS_SAMPLER_KEYS = frozenset(
    {
        "algorithm_type", "corrector_order", "disable_corrector", "euler_at_final", "final_sigmas_type",
        "interpolation_type", "lambda_min_clipped", "lower_order_final", "predict_x0", "predictor_order",
        "set_alpha_to_one", "skip_prk_steps", "solver_order", "solver_p", "solver_type", "timestep_type",
        "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "variance_type",
        "sigma_min", "sigma_max", "original_inference_steps", "timestep_scaling", "noise_sampler_seed",  # (LCM's grid: read apart)
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
# LCMScheduler: SD's betas (it was written for SD-distilled models) and "leading" spacing, which its
# skipped grid ignores (``schedules.lcm_grid``); it never clips by default.
LCM_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        **_DIFFUSERS_COMMON_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
        "clip_sample": False,
    }
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
    # LCM models: the length of the grid the model was distilled on (LCMScheduler's key, Luo et al. 2023,
    # sec. 4.3); None where the file gives none (LCM's default, 50). How the model was made, so it is read with
    # the model; the lcm sampler's own option overrides it per call.
    original_inference_steps: int | None = None
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
        n = self.original_inference_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"original_inference_steps must be a whole number of at least 1, got {n!r}")
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
        if config.get("original_inference_steps") is not None and "original_inference_steps" not in used_defaults:
            values["original_inference_steps"] = config["original_inference_steps"]
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
        if self.original_inference_steps is not None:
            values["original_inference_steps"] = self.original_inference_steps
        return {
            **dict(sorted(values.items())),
            "set_alpha_to_one": False,
            "trained_betas": None,
            "_class_name": "DDIMScheduler",
        }


def _process_keys() -> tuple[str, ...]:
    """The noise-process keys of ``SchedulerConfig`` (every field but ``defaulted`` and LCM's distillation grid,
    which no sampler fills with a default of its own)."""
    return tuple(f.name for f in dataclasses.fields(SchedulerConfig) if f.name not in ("defaulted", "original_inference_steps"))
