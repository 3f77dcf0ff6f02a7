"""A generation's settings: every choice of a call, its default and its check, in one place.

    GenerationSettings   what ``ldm txt2img``, ``Pipeline.__call__`` and (coming) the HTTP API build
                         from their arguments: model-free, frozen, checked when it is made
    ResolvedSettings     what made a call's images: the settings with the fields that depend on the
                         model filled in (steps, guidance, size), the seeds drawn, and the sampler,
                         model, VAE, adapters and embeddings used named; returned with the images,
                         written into each PNG

A bad value is a ``SettingError`` whose message names the field as a ``{field}`` placeholder, so the
command line reports ``--guidance-scale`` where Python reports ``guidance_scale``. Nothing here
imports torch: the command line checks its arguments in milliseconds, before loading anything.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from PIL import Image

from ldm import checks
from ldm.control import ControlUnit, control_units
from ldm.errors import InputError, SettingError, placeholder_text
from ldm.images import GenerationParameters, init_image_size, read_image, to_rgb
from ldm.inpainting import Inpaint
from ldm.prompt_schedule import split_subprompts
from ldm.prompts import NETWORK_TAG, LoraTag, check_prompt, split_lora_tags
from ldm.sdxl import DEFAULT_REFINER_SWITCH, SdxlOptions, check_refiner_switch

# Our scheduler names, and each as AUTOMATIC1111 writes it in "Sampler:", so other tools recognise
# it. dpm-solver (the noise-prediction multistep solver) has no A1111 counterpart and keeps a plain
# name. A test keeps the keys equal to ``ldm.schedulers.SCHEDULERS`` (which imports torch).
SAMPLER_NAMES = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "dpm-solver": "DPM-Solver 2M",
    "dpm-solver++": "DPM++ 2M",
    "dpm-solver++-sde": "DPM++ 2M SDE",
    "euler": "Euler",
    "euler-ancestral": "Euler a",
    "unipc": "UniPC",
    "lcm": "LCM",
}
TimestepSpacing = Literal["leading", "linspace", "trailing"]  # = ldm.schedulers.noise's (a test keeps them equal)
TIMESTEP_SPACINGS = get_args(TimestepSpacing)
# The noise levels a sigma-stepping sampler visits: spaced as its timesteps, Karras et al. 2022's
# eq. 5, or evenly in log sigma; A1111 writes them as "Schedule type" (spaced is its "Automatic").
SigmaSchedule = Literal["spaced", "karras", "exponential"]
SIGMA_SCHEDULES = {"spaced": "Automatic", "karras": "Karras", "exponential": "Exponential"}

DEFAULT_SCHEDULER = "dpm-solver++"  # DPM-Solver++(2M) converges in 20-25 steps (Lu et al. 2022b, sec. 6)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_STRENGTH = 0.8  # img2img: diffusers' and A1111's default denoising strength

# Hires fix (A1111's txt2img "Hires. fix"; ldm.pipeline.hires): how the first pass's result is enlarged, by
# A1111's names. The latent ones interpolate the latents as A1111's ``shared.latent_upscale_modes`` do
# (torch's interpolate mode, antialias); Lanczos resizes the decoded image with PIL and encodes it again.
LATENT_UPSCALERS = MappingProxyType({
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
})  # fmt: skip
HIRES_UPSCALERS = (*LATENT_UPSCALERS, "Lanczos")
DEFAULT_HIRES_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode
DEFAULT_HIRES_STRENGTH = 0.7  # A1111's txt2img "Denoising strength" slider for the hires pass


@dataclass(frozen=True)
class GenerationDefaults:
    """The steps and guidance a call uses when it does not give them.

    A model folder may recommend its own in ``generation_config.json`` (as transformers' models do
    for text generation): a model trained on simple data can need less guidance than SD's 7.5.
    ``ldm.loading`` reads and checks it for folders and single files alike (``Components.generation_config``).
    """

    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    num_inference_steps: int = DEFAULT_STEPS
    scheduler: str = DEFAULT_SCHEDULER  # e.g. "lcm" for a model distilled for LCM's few steps

    def __post_init__(self) -> None:
        # A model's file is checked when it is read, not blamed on every later call.
        checks.check_guidance_scale(self.guidance_scale)
        checks.check_steps(self.num_inference_steps)
        if self.scheduler not in SAMPLER_NAMES:
            raise InputError(f"unknown scheduler {checks.shown(self.scheduler)}; choose one of {', '.join(SAMPLER_NAMES)}")

    def fill(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """The given steps and guidance, each left as None replaced by its default."""
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        return steps, self.guidance_scale if guidance_scale is None else guidance_scale


@dataclass(frozen=True)
class GenerationSettings:
    """Every choice of one generation call; None where the model decides (its recommendation, its size).

    ``prompt`` and ``negative_prompt`` are kept as tuples, one negative per prompt. ``init_image``
    (an image, a path, or a (1, 3, H, W) tensor in [-1, 1]) with ``strength`` makes it img2img.
    """

    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...] = ()  # () or "": no negative prompt
    num_inference_steps: int | None = None  # None: the model's recommendation, else DEFAULT_STEPS
    guidance_scale: float | None = None  # classifier-free guidance; <= 1 turns it off; None: the model's, else 7.5
    guidance_rescale: float = 0.0  # Lin et al. 2024, sec. 3.4: 0..1, for v-prediction models
    guidance_fraction: float = 1.0  # guidance in the first ceil(fraction * steps) steps only
    width: int | None = None  # None: the init image's, else the model's native size
    height: int | None = None
    num_images_per_prompt: int = 1
    scheduler: str | None = None  # a name of SAMPLER_NAMES; None: the model's recommendation, else DEFAULT_SCHEDULER
    eta: float | None = None  # DDIM's noise; None: the scheduler's default
    timestep_spacing: TimestepSpacing | None = None  # None: the model's scheduler config
    sigma_schedule: SigmaSchedule = "spaced"
    timesteps: tuple[float, ...] | None = None  # the run's own timesteps, descending, instead of a schedule
    sigmas: tuple[float, ...] | None = None  # the run's own sigmas (steps + 1, ending where the run ends)
    seed: int | None = None  # image i gets seed + i; None or -1: a random seed
    subseed: int | None = None  # A1111's variation seed: image i's noise leans toward subseed + i's; None or -1: random
    subseed_strength: float = 0.0  # how far it leans: 0 (off) to 1 (the variation seed's noise); see ldm.random.slerp
    init_image: Any = None  # PIL image, path or tensor: img2img
    strength: float | None = None  # img2img: how much to change the image, (0, 1]; None: DEFAULT_STRENGTH
    clip_skip: int | None = None  # use the text encoder's k-th layer from the end (diffusers' meaning)
    deepcache_interval: int = 1  # DeepCache: the full U-Net every N-th step only (1 = off)
    token_merging: float = 0.0  # ToMe ratio in full-resolution self-attention (0 = off)
    control: tuple[ControlUnit, ...] = ()  # ControlNets (ldm.control), their residuals summed
    # Hires fix: a second, img2img pass at ``hires_scale`` times the size (None: off; ldm.pipeline.hires).
    hires_scale: float | None = None
    hires_steps: int = 0  # the second pass's step count, of which strength x steps run; 0: num_inference_steps
    hires_strength: float | None = None  # its denoising strength, (0, 1]; None: DEFAULT_HIRES_STRENGTH
    hires_upscaler: str | None = None  # a name of HIRES_UPSCALERS (any case); None: DEFAULT_HIRES_UPSCALER
    # Inpainting / outpainting of init_image: the mask or the borders to add, and A1111's options (ldm.inpainting).
    inpaint: Inpaint | None = None
    # SDXL (ldm.sdxl, ldm.pipeline.sdxl): the second text encoder's prompts (None: the prompts), the micro-conditioning
    # and schedule window, and A1111's refiner: a model file, folder or loaded name, taking over at ``refiner_switch``.
    prompt_2: tuple[str, ...] | None = None
    negative_prompt_2: tuple[str, ...] | None = None
    sdxl: SdxlOptions | None = None
    refiner: str | Path | None = None
    refiner_switch: float | None = None  # None: DEFAULT_REFINER_SWITCH with a refiner

    def __post_init__(self) -> None:
        prompts = (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)
        object.__setattr__(self, "prompt", prompts)
        object.__setattr__(self, "negative_prompt", self._negatives(len(prompts)))
        if isinstance(self.init_image, (str, Path)):
            object.__setattr__(self, "init_image", read_image(self.init_image))
        elif isinstance(self.init_image, Image.Image):
            object.__setattr__(self, "init_image", to_rgb(self.init_image))
        self._check_prompts()
        self._check_numbers()
        self._check_choices()
        self._check_control()
        self._check_hires()
        self._check_inpaint()
        self._check_sdxl()

    def _negatives(self, count: int) -> tuple[str, ...]:
        negatives = self.negative_prompt
        if negatives is None or isinstance(negatives, str):
            return (negatives or "",) * count
        negatives = tuple(negatives)
        if not negatives:
            return ("",) * count
        if len(negatives) != count:
            raise SettingError(f"got {len(negatives)} negative prompts for {count} prompts; give one {{negative_prompt}} per prompt")
        return negatives

    def _check_prompts(self) -> None:
        if not self.prompt:
            raise SettingError("the {prompt} list is empty; give at least one prompt")
        for text in self.prompt:
            check_prompt(split_lora_tags(text, "prompt")[0], "prompt")
            try:
                split_subprompts(split_lora_tags(text)[0])
            except InputError as error:
                raise SettingError(f"{{prompt}}: {placeholder_text(str(error))}") from None
        for text in self.negative_prompt:
            check_prompt(text, "negative_prompt")
            if NETWORK_TAG.search(text):
                # A1111 applies the tags of the prompt only, and encodes these as words.
                raise SettingError(
                    f"{{negative_prompt}} has {placeholder_text(NETWORK_TAG.search(text).group(0))}, but LoRA tags act "
                    "only in {prompt}; move it there (a negative weight subtracts a LoRA)"
                )

    def _check_sdxl(self) -> None:
        """The second encoder's prompts (one per prompt; taking editing and alternation but no LoRA tags or ``AND``),
        the SDXL options and the refiner's switch."""
        for name in ("prompt_2", "negative_prompt_2"):
            texts = getattr(self, name)
            if texts is None:
                continue
            texts = (texts,) * len(self.prompt) if isinstance(texts, str) else tuple(texts)
            if len(texts) != len(self.prompt):
                raise SettingError(f"got {len(texts)} of {{{name}}} for {len(self.prompt)} prompts; give one per prompt")
            for text in texts:
                check_prompt(text, name)
                if NETWORK_TAG.search(text) or len(split_subprompts(text)) > 1 or split_subprompts(text)[0][1] != 1.0:
                    raise SettingError(f"{{{name}}} takes no LoRA tags, AND or sub-prompt weights; write them in {{prompt}}")
            object.__setattr__(self, name, texts)
        if self.sdxl is not None and not isinstance(self.sdxl, SdxlOptions):
            raise SettingError(f"{{sdxl}} must be an ldm.sdxl.SdxlOptions, got {type(self.sdxl).__name__}")
        if self.refiner is None:
            if self.refiner_switch is not None:
                raise SettingError("{refiner_switch} says when the refiner takes over; give the {refiner} too")
            return
        object.__setattr__(self, "refiner_switch", check_refiner_switch(DEFAULT_REFINER_SWITCH if self.refiner_switch is None else self.refiner_switch))
        if self.sdxl is not None and (self.sdxl.denoising_end is not None or self.sdxl.denoising_start is not None):
            raise SettingError("{refiner_switch} sets where the base stops and the refiner starts; drop denoising_start/denoising_end")

    def lora_tags(self) -> tuple[LoraTag, ...]:
        """The LoRA tags of the prompts (docs/prompts.md), which every prompt of a call must share:
        one call runs one set of weights."""
        tags = [split_lora_tags(text)[1] for text in self.prompt]
        for text, other in zip(self.prompt[1:], tags[1:]):
            if _chosen(other) != _chosen(tags[0]):
                raise SettingError(
                    f"the prompts of one call name different LoRAs ({placeholder_text(_tags_shown(tags[0]))} vs "
                    f"{placeholder_text(_tags_shown(other))} in {placeholder_text(repr(text))}); one call runs one set of "
                    "weights: give every {prompt} the same tags, or make them in separate calls"
                )
        return tags[0]

    def image_seed(self, i: int) -> int:
        """The seed of image ``i`` of a run from ``seed`` (resolved): seed + i, or, with variation seeds on, the
        seed itself for every image (A1111's rule: only the variation seeds count up)."""
        return self.seed + (0 if self.subseed_strength else i)

    def from_image(self, i: int) -> GenerationSettings:
        """These settings for a batch that starts at image ``i`` of the run: its seed and variation seed."""
        subseed = None if self.subseed is None else self.subseed + i
        return replace(self, seed=self.image_seed(i), subseed=subseed)

    def composed(self) -> bool:
        """Whether a prompt has sub-prompts or a sub-prompt weight (``a AND b``, ``a :1.2``; ldm.prompt_schedule),
        which guidance combines instead of reading one conditional pass."""
        parts = [split_subprompts(split_lora_tags(text)[0]) for text in self.prompt]
        return any(len(subprompts) > 1 or subprompts[0][1] != 1.0 for subprompts in parts)

    def _check_numbers(self) -> None:
        if self.num_inference_steps is not None:
            checks.check_steps(self.num_inference_steps)
        if self.guidance_scale is not None:
            checks.check_guidance_scale(self.guidance_scale)
        checks.check_guidance_rescale(self.guidance_rescale)
        checks.check_guidance_fraction(self.guidance_fraction)
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                checks.check_side(getattr(self, name), name)
        checks.check_count(self.num_images_per_prompt, "num_images_per_prompt")
        if self.eta is not None:
            checks.check_eta(self.eta)
        if self.seed is not None:
            checks.check_seed(self.seed, self.num_images_per_prompt)
        if self.subseed is not None:
            checks.check_seed(self.subseed, self.num_images_per_prompt, "subseed")
        checks.check_subseed_strength(self.subseed_strength)
        if self.strength is not None:
            checks.check_strength(self.strength)
        if self.clip_skip is not None:
            checks.check_clip_skip(self.clip_skip)
        checks.check_deepcache_interval(self.deepcache_interval)
        checks.check_token_merging(self.token_merging)

    def _check_choices(self) -> None:
        if self.scheduler is not None and self.scheduler not in SAMPLER_NAMES:
            shown = checks.shown(self.scheduler)
            raise SettingError(f"unknown {{scheduler}} {shown}; choose one of {', '.join(SAMPLER_NAMES)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            shown = checks.shown(self.timestep_spacing)
            raise SettingError(f"{{timestep_spacing}} must be one of {', '.join(TIMESTEP_SPACINGS)}, got {shown}")
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            shown = checks.shown(self.sigma_schedule)
            raise SettingError(f"{{sigma_schedule}} must be one of {', '.join(SIGMA_SCHEDULES)}, got {shown}")
        self._check_points()
        if self.strength is not None and self.init_image is None:
            raise SettingError("{strength} only applies with {init_image}")

    def _check_control(self) -> None:
        object.__setattr__(self, "control", control_units(self.control))
        if self.control and self.deepcache_interval > 1:
            raise SettingError("{deepcache_interval} reuses deep features that a ControlNet changes every step; drop one of them")

    def _check_inpaint(self) -> None:
        """A mask or outpainting needs an init image (a PIL image: the mask is laid over it), and the mask is fitted to it."""
        if self.inpaint is None:
            return
        if not isinstance(self.inpaint, Inpaint):
            raise SettingError(f"{{inpaint}} must be an ldm.inpainting.Inpaint, got {type(self.inpaint).__name__}")
        what = "{mask}" if self.inpaint.mask is not None else "{outpaint}"
        if self.init_image is None:
            raise SettingError(f"{what} needs an {{init_image}}: it repaints part of an image; give the image to change")
        if not isinstance(self.init_image, Image.Image):
            raise SettingError(f"{what} needs the {{init_image}} as an image or a file, not a tensor")
        if self.inpaint.outpaint is not None and (self.width is not None or self.height is not None):
            grown = self.inpaint.size(self.init_image, None, None, 0, 8)  # what filled() sets them to
            if (self.width, self.height) != grown:
                raise SettingError(
                    f"{{outpaint}} sets the size (the init image's plus the borders: {grown[0]}x{grown[1]}); drop {{width}} and {{height}}"
                )
        object.__setattr__(self, "inpaint", self.inpaint.fitted(self.init_image))

    def _check_points(self) -> None:
        """The run's own timesteps or sigmas: finite, descending, and instead of a step count and schedule."""
        if self.timesteps is not None and self.sigmas is not None:
            raise SettingError("give {timesteps} or {sigmas}, not both")
        for name in ("timesteps", "sigmas"):
            points = getattr(self, name)
            if points is None:
                continue
            points = tuple(checks.finite(value, name) for value in points)
            object.__setattr__(self, name, points)
            if len(points) < (2 if name == "sigmas" else 1) or any(a <= b for a, b in zip(points, points[1:])):
                raise SettingError(f"{{{name}}} must be a descending list of numbers, got {checks.shown(list(points))}")
            if self.num_inference_steps is not None and self.num_inference_steps != self.own_step_count(points, name):
                raise SettingError(f"{{num_inference_steps}} must match the {{{name}}} given; leave it out")
            if self.sigma_schedule != "spaced" or self.timestep_spacing is not None:
                raise SettingError(f"{{{name}}} replace the schedule; drop {{sigma_schedule}} and {{timestep_spacing}}")

    @staticmethod
    def own_step_count(points: tuple[float, ...], name: str) -> int:
        """Steps a run on its own points takes: one per timestep; sigmas include where the run ends."""
        return len(points) - 1 if name == "sigmas" else len(points)

    @staticmethod
    def sigma_schedule_of(use_karras_sigmas: bool, use_exponential_sigmas: bool) -> SigmaSchedule:
        """The ``sigma_schedule`` that diffusers' two option names ask for."""
        if use_karras_sigmas and use_exponential_sigmas:
            raise SettingError("{use_karras_sigmas} and {use_exponential_sigmas} exclude each other; choose one")
        return "karras" if use_karras_sigmas else "exponential" if use_exponential_sigmas else "spaced"

    # --- what the model decides --------------------------------------------------------------------

    @property
    def batch(self) -> int:
        """Images the call makes: num_images_per_prompt of each prompt."""
        return len(self.prompt) * self.num_images_per_prompt

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (a resolved guidance scale above 1)."""
        return self.guidance_scale is not None and self.guidance_scale > 1.0

    @property
    def img2img_steps(self) -> int:
        """The steps img2img runs of a resolved ``num_inference_steps``: the last ``strength`` of them."""
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)

    def scheduler_options(self) -> dict[str, Any]:
        """The scheduler's options this call sets (only those given: the rest are the scheduler's defaults)."""
        options = {} if self.eta is None else {"eta": self.eta}
        if self.sigma_schedule != "spaced":
            options[f"use_{self.sigma_schedule}_sigmas"] = True  # diffusers' option names
        return options

    def points_step_count(self) -> int | None:
        """The steps the run's own timesteps or sigmas make (None without them)."""
        if self.timesteps is not None:
            return self.own_step_count(self.timesteps, "timesteps")
        return self.own_step_count(self.sigmas, "sigmas") if self.sigmas is not None else None

    def filled(self, defaults: GenerationDefaults, native_side: int, factor: int) -> GenerationSettings:
        """These settings with the sampler, steps and guidance from ``defaults`` and the size known.

        The size is as given, else the init image's rounded down to ``factor`` (the VAE's
        downsampling), else ``native_side`` (the model's). Checked for the model's factor.
        """
        width, height = self.width, self.height
        if isinstance(self.init_image, Image.Image):
            width, height = init_image_size(self.init_image, width, height, factor)
        elif self.init_image is not None:  # a tensor, checked by the pipeline
            height, width = self.init_image.shape[-2:]
        if self.inpaint is not None:  # outpainting grows the image; "only masked" generates the model's size
            width, height = self.inpaint.size(self.init_image, self.width, self.height, native_side, factor)
        width, height = width or native_side, height or native_side
        steps, guidance_scale = defaults.fill(self.num_inference_steps or self.points_step_count(), self.guidance_scale)
        filled = replace(
            self,
            scheduler=self.scheduler or defaults.scheduler,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            width=checks.check_side(width, "width", factor),
            height=checks.check_side(height, "height", factor),
            strength=(self.strength or DEFAULT_STRENGTH) if self.init_image is not None else None,
        )
        if filled.init_image is not None and filled.img2img_steps == 0:
            raise SettingError(
                f"{{strength}} {filled.strength:g} x {filled.num_inference_steps} {{num_inference_steps}} leaves no step "
                "to run; raise either"
            )
        return filled


    # --- hires fix (ldm.pipeline.hires) ------------------------------------------------------------

    def _check_hires(self) -> None:
        """The hires pass's options: only with ``hires_scale``, only for txt2img; their defaults filled in."""
        if self.hires_scale is None:
            given = [name for name, off in (("hires_steps", 0), ("hires_strength", None), ("hires_upscaler", None)) if getattr(self, name) != off]
            if given:
                raise SettingError(f"{{{given[0]}}} sets the hires pass, which {{hires_scale}} turns on; give the scale too (e.g. 2)")
            return
        scale = checks.finite(self.hires_scale, "hires_scale")
        if scale < 1:
            raise SettingError(f"{{hires_scale}} must be 1 or more (the second pass's size over the first's), got {checks.shown(self.hires_scale)}")
        if checks.integer(self.hires_steps, "hires_steps") != 0:  # 0: as many as num_inference_steps
            checks.check_steps(self.hires_steps, "hires_steps")
        strength = DEFAULT_HIRES_STRENGTH if self.hires_strength is None else checks.check_strength(self.hires_strength, "hires_strength")
        if self.init_image is not None:
            raise SettingError("{hires_scale} adds a second pass to txt2img; for img2img give the larger {width} and {height} instead")
        if self.timesteps is not None or self.sigmas is not None:
            raise SettingError("{timesteps} and {sigmas} replace the first pass's schedule and the hires pass has its own; drop them or {hires_scale}")
        object.__setattr__(self, "hires_scale", scale)
        object.__setattr__(self, "hires_strength", strength)
        object.__setattr__(self, "hires_upscaler", hires_upscaler_named(self.hires_upscaler or DEFAULT_HIRES_UPSCALER))

    def hires_size(self, factor: int) -> tuple[int, int]:
        """The hires pass's (width, height), of resolved settings: A1111's int(side x scale), rounded down to the
        VAE's ``factor`` (A1111's latent upscale makes side // 8 latents; ldm rounds so for every upscaler)."""
        return int(self.width * self.hires_scale) // factor * factor, int(self.height * self.hires_scale) // factor * factor

    @property
    def hires_pass_steps(self) -> int:
        """The steps the hires pass runs, of resolved settings: ``hires_steps`` (0: ``num_inference_steps``), all
        of them, as A1111 runs ``hr_second_pass_steps``; 0 without the pass."""
        return 0 if self.hires_scale is None else self.hires_steps or self.num_inference_steps

    @property
    def hires_schedule_steps(self) -> int:
        """The schedule the hires pass takes its last ``hires_pass_steps`` from: A1111's img2img with a step
        count given (``setup_img2img_steps``) spreads them over int(steps / min(strength, 0.999)) steps, so the
        pass starts at the noise level the strength asks for and still runs every step it was given."""
        return int(self.hires_pass_steps / min(self.hires_strength, 0.999))

    @property
    def total_steps(self) -> int:
        """The denoising steps a call of resolved settings runs, its hires pass included (for progress)."""
        return (self.img2img_steps if self.init_image is not None else self.num_inference_steps) + self.hires_pass_steps

    def hires_infotext(self) -> dict[str, str]:
        """The hires pass's A1111 infotext keys (nothing without it); "Size" stays the first pass's, as A1111 writes it."""
        if self.hires_scale is None:
            return {}
        extra = {"Denoising strength": f"{self.hires_strength:g}", "Hires upscale": f"{self.hires_scale:g}"}
        if self.hires_steps:
            extra["Hires steps"] = str(self.hires_steps)
        return {**extra, "Hires upscaler": self.hires_upscaler}


def hires_upscaler_named(name: str) -> str:
    """A hires upscaler as A1111 names it (``HIRES_UPSCALERS``), from its name in any case (``latent``, ``lanczos``)."""
    found = {known.lower(): known for known in HIRES_UPSCALERS}.get(name.lower()) if isinstance(name, str) else None
    if found is None:
        raise SettingError(f"unknown {{hires_upscaler}} {checks.shown(name)}; choose one of {', '.join(HIRES_UPSCALERS)}")
    return found


def _chosen(tags: tuple[LoraTag, ...]) -> set[tuple[str, float, float]]:
    return {(tag.name, tag.text_encoder, tag.unet) for tag in tags}


def _tags_shown(tags: tuple[LoraTag, ...]) -> str:
    return " ".join(tag.text for tag in tags) or "none"


# Each field's default, written once above: the CLI's flags and Pipeline.__call__'s keywords use these.
DEFAULTS = MappingProxyType({f.name: f.default for f in fields(GenerationSettings) if f.default is not MISSING})


@dataclass(frozen=True)
class ResolvedSettings:
    """What made a call's images: ``settings`` filled in (``GenerationSettings.filled``) and named."""

    settings: GenerationSettings
    seeds: tuple[int, ...] | None  # image i's seed; None when the caller passed generators
    sampler: str  # as image metadata names it: A1111's name, or the scheduler object's class
    model: str  # the model folder's or file's name
    model_hash: str | None = None  # A1111's short hash of a single-file model (None for a folder)
    adapters: tuple[tuple[str, float], ...] = ()  # (LoRA name, scale) of those loaded by name, in load order
    version: str = ""  # ldm's version
    vae: str | None = None  # the VAE file or folder that replaced the model's own (None: the model's)
    lora_hashes: tuple[tuple[str, str], ...] = ()  # (name, A1111 hash) of each LoRA the prompt's tags apply
    embeddings: tuple[tuple[str, str], ...] = ()  # (name, A1111's short hash) of each embedding the prompts use
    controlnets: tuple[str, ...] = ()  # each control unit's model as A1111 names it: "name [hash]" (or "name")
    refiner: str | None = None  # the SDXL refiner as A1111 names it: "name [hash]" (or "name")

    def prompts(self) -> list[tuple[str, str]]:
        """(prompt, negative prompt) of each image, in image order."""
        s = self.settings
        return [(p, n) for p, n in zip(s.prompt, s.negative_prompt) for _ in range(s.num_images_per_prompt)]

    def parameters(self) -> list[GenerationParameters]:
        """Each image's A1111 ``parameters`` (the PNG infotext): what made it, as A1111 names it."""
        if self.seeds is None:
            raise SettingError("these images were made with generators, so their seeds are unknown; pass {seed} instead")
        s = self.settings
        return [
            GenerationParameters(
                prompt=prompt, negative_prompt=negative, steps=s.num_inference_steps, sampler=self.sampler,
                cfg_scale=s.guidance_scale, seed=seed, width=s.width, height=s.height, model=self.model,
                extra={**self.infotext_extra(), **self.variation(i)},
            )
            for i, ((prompt, negative), seed) in enumerate(zip(self.prompts(), self.seeds))
        ]

    def variation(self, i: int) -> dict[str, str]:
        """Image i's variation seed and strength as A1111 writes them (nothing when the strength is 0)."""
        s = self.settings
        if not s.subseed_strength or s.subseed is None:
            return {}
        return {"Variation seed": str(s.subseed + i), "Variation seed strength": f"{s.subseed_strength:g}"}

    def infotext_extra(self) -> dict[str, str]:
        """The optional A1111 infotext keys of these settings, each only where it is not the default."""
        s = self.settings
        extra = {}
        if s.strength is not None:
            extra["Denoising strength"] = f"{s.strength:g}"
        extra.update(s.hires_infotext())
        if s.inpaint is not None:
            extra.update(s.inpaint.infotext())  # Mask blur, Inpaint area, Masked content, ...
        if s.clip_skip:
            extra["Clip skip"] = str(s.clip_skip + 1)  # A1111 counts the last layer as 1, diffusers as 0
        if s.eta is not None:
            extra["Eta"] = f"{s.eta:g}"
        if s.sigma_schedule != "spaced":
            extra["Schedule type"] = SIGMA_SCHEDULES[s.sigma_schedule]  # A1111's key and values
        if s.timestep_spacing is not None:
            extra["Timestep spacing"] = s.timestep_spacing
        for name, points in (("Timesteps", s.timesteps), ("Sigmas", s.sigmas)):
            if points is not None:
                extra[name] = " ".join(f"{value:g}" for value in points)
        if s.guidance_rescale:
            extra["Guidance rescale"] = f"{s.guidance_rescale:g}"
        if s.deepcache_interval > 1:
            extra["DeepCache interval"] = str(s.deepcache_interval)
        if s.guidance_fraction < 1:
            extra["Guidance fraction"] = f"{s.guidance_fraction:g}"
        if s.token_merging:
            extra["Token merging ratio"] = f"{s.token_merging:g}"
        if self.model_hash:
            extra["Model hash"] = self.model_hash
        if self.vae:
            extra["VAE"] = self.vae
        if self.adapters:
            extra["Lora"] = ", ".join(f"{name}: {scale:g}" for name, scale in self.adapters)
        if self.lora_hashes:  # the tags themselves stay in the prompt, as A1111 keeps them
            extra["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in self.lora_hashes)
        if self.embeddings:  # A1111 drops the separators from a name so the list reads back
            extra["TI hashes"] = ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in self.embeddings)
        for i, (unit, model) in enumerate(zip(s.control, self.controlnets)):
            extra[f"ControlNet {i}"] = unit.infotext(model)  # sd-webui-controlnet's key and fields
        if s.sdxl is not None:
            extra.update(s.sdxl.infotext())
        if self.refiner is not None:  # A1111's keys
            extra.update({"Refiner": self.refiner, "Refiner switch at": f"{s.refiner_switch:g}"})
        if self.version:
            extra["Version"] = f"ldm {self.version}"
        return extra

