"""The scheduler contract, and a scheduler as the three parts it is made of.

A scheduler for one run is

    NoiseProcess (process.py)   the model's trained noise process, from its ``SchedulerConfig``
    Schedule (schedules.py)     which timesteps / sigmas the run visits
    step rule (this class's     the update math: DDIM, DPM-Solver(++), Euler, UniPC, DDPM, ...
      subclass, one file per family)

``Rule(config, **options)`` builds the first two from the config (filled with the rule's
diffusers defaults) and the options (``use_karras_sigmas``, ``use_exponential_sigmas``);
``Rule.from_parts(process, schedule, **options)`` combines hand-built ones. Every scheduler honours
the same contract:

    set_timesteps(n, device=None, *, timesteps=None, sigmas=None)
                                    reset per-run state and lay out n steps, or the caller's own
                                    timesteps (n of them) or VE sigmas (n + 1, end point last)
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from ldm.errors import ConfigError
from ldm.schedulers.config import LINSPACE_DEFAULTS, SchedulerConfig
from ldm.schedulers.process import NoiseProcess
from ldm.schedulers.schedules import Schedule, SigmaSchedule

S = TypeVar("S", bound="Scheduler")


@dataclass(frozen=True)
class NoOptions:
    """A scheduler without options of its own."""


@dataclass(frozen=True)
class SigmaOptions:
    """Options of the rules that step in sigma: which sigmas the run visits, under diffusers' names
    (the ``Schedule`` holds the choice as one ``sigma_schedule``)."""

    use_karras_sigmas: bool = False  # Karras et al. 2022, eq. 5
    use_exponential_sigmas: bool = False  # evenly spaced in log sigma (k-diffusion get_sigmas_exponential)

    def __post_init__(self) -> None:
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ConfigError("use_karras_sigmas and use_exponential_sigmas exclude each other; choose one")

    @property
    def sigma_schedule(self) -> SigmaSchedule:
        if self.use_karras_sigmas:
            return "karras"
        return "exponential" if self.use_exponential_sigmas else "spaced"


class Scheduler(abc.ABC):
    """A noise process, a schedule and a step rule; the parts of the contract common to all rules.

    Subclasses set ``Options`` (a frozen dataclass of their typed options; ``SigmaOptions`` or a
    subclass of it for rules that take Karras / exponential sigmas) and, where their diffusers
    class's defaults are not ``LINSPACE_DEFAULTS``, ``DIFFUSERS_DEFAULTS``; they implement
    ``_start_run`` (lay out the grid with a ``schedules`` function, reset their history) and ``step``.
    """

    Options: ClassVar[type] = NoOptions
    # The defaults of this sampler's diffusers class, for keys the model's config left out.
    DIFFUSERS_DEFAULTS: ClassVar[Mapping[str, Any]] = LINSPACE_DEFAULTS
    # Whether the config's timestep_spacing and steps_offset lay out this rule's grid; LCM's grid,
    # the timesteps its model was distilled on, has no spacing.
    SPACED: ClassVar[bool] = True

    def __init__(self, config: SchedulerConfig | None = None, **options: Any) -> None:
        config = config if config is not None else SchedulerConfig()
        if not isinstance(config, SchedulerConfig):
            raise ConfigError(f"expected a SchedulerConfig, got {type(config).__name__}")
        config = config.filled_for(self.DIFFUSERS_DEFAULTS)
        built = build_options(type(self), options)
        sigma_schedule = built.sigma_schedule if isinstance(built, SigmaOptions) else "spaced"
        self._assemble(config, NoiseProcess.from_config(config), Schedule.from_config(config, sigma_schedule), built)

    @classmethod
    def from_parts(cls: type[S], process: NoiseProcess, schedule: Schedule, **options: Any) -> S:
        """This rule over a hand-built process and schedule, with the rule's own ``options``.

        The result's ``config`` and ``options`` describe all three (the schedule's spacing in the
        config, its sigma schedule in ``use_karras_sigmas`` / ``use_exponential_sigmas``), so
        ``type(s)(s.config, **asdict(s.options))`` builds the same scheduler again.
        """
        if schedule.has_own_points:
            raise ConfigError("a scheduler's schedule cannot hold its own points; pass them to set_timesteps")
        given = sorted(options.keys() & {f.name for f in dataclasses.fields(SigmaOptions)})
        if given:
            raise ConfigError(f"{', '.join(given)}: give the sigma schedule as Schedule(sigma_schedule=...)")
        if issubclass(cls.Options, SigmaOptions):
            kind = schedule.sigma_schedule
            options = {**options, "use_karras_sigmas": kind == "karras", "use_exponential_sigmas": kind == "exponential"}
        elif schedule.sigma_schedule != "spaced":
            raise ConfigError(f"{cls.__name__} steps between timesteps; it takes no {schedule.sigma_schedule} sigmas")
        config = process.config.with_values(timestep_spacing=schedule.spacing, steps_offset=schedule.steps_offset)
        scheduler = cls.__new__(cls)  # __init__ would build the process and schedule from a config
        scheduler._assemble(config, process, schedule, build_options(cls, options))
        return scheduler

    def _assemble(self, config: SchedulerConfig, process: NoiseProcess, schedule: Schedule, options: Any) -> None:
        self.config = config  # filled: every key set
        self.process = process
        self.schedule = schedule
        self.options = options
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self.num_inference_steps = 0
        self._step_index: int | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.process.alphas_cumprod

    @property
    def betas(self) -> torch.Tensor:
        return self.process.betas

    # --- the contract ---------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Lay out this run's grid and reset the per-run state.

        ``num_inference_steps`` steps of the scheduler's schedule, or the caller's own points as
        diffusers' ``set_timesteps`` takes them: ``timesteps`` (descending training timesteps,
        whole numbers except for Euler) or ``sigmas`` (descending VE sigmas, the last one where the
        run ends, for the rules that step in sigma). Bad points are a ConfigError.
        """
        schedule = self.schedule.with_points(timesteps, sigmas)
        n = schedule.step_count(num_inference_steps, self.process.num_train_timesteps)
        self._start_run(schedule, n)
        self.timesteps = self.timesteps.to(device)
        self.num_inference_steps, self._step_index = n, None

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        return sample

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
        return self.process.add_noise(x0, eps, t)

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The regression target of a network of ``config.prediction_type`` at (x0, eps, t)."""
        return self.process.training_target(x0, eps, t)

    @abc.abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor | int | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """One denoising step from ``sample`` at ``t`` to the previous sample."""

    # --- for subclasses -------------------------------------------------------------------------

    @abc.abstractmethod
    def _start_run(self, schedule: Schedule, n: int) -> None:
        """Set ``timesteps`` (on the CPU) and the rule's per-run state for ``n`` steps of ``schedule``."""

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
