"""The stages of one generation call, in the order ``Pipeline.generate`` runs them.

    resolve            settings -> a Call: the model's defaults filled in, seeds drawn, scheduler built,
                       the prompt's LoRA tags found in the LoRA folder
    apply_loras        the tags' LoRAs made the active tag-loaded adapters, at their scales
    encode_prompts     text encoder: prompts without tags (and negatives, when guided) -> text states per image and
                       step (A1111's prompt editing, alternation and AND: ldm.prompt_schedule)
    prepare_timesteps  the scheduler's timesteps; img2img keeps the last ``strength`` of them
    initial_latents    noise from each image's generator, or the noised init image, or given latents
    denoise            x <- scheduler.step(denoiser(x, t), t, x), denoiser = guidance o speed-ups o U-Net
    (hires pass)       ldm.pipeline.hires: with ``hires_scale``, the result upscaled and run through the three
                       stages above again as img2img at the larger size (A1111's hires fix)
    decode_output      VAE decode (full / sliced / tiled; a KL-VAE or TAESD) -> images in the requested output type

A new kind of conditioning (an inpainting mask, a control image, SDXL's extra inputs) is a new
stage or a new denoiser wrapper, not an ``if`` in ``Pipeline.generate``. Every network runs inside
``pipe.residency.running(...)`` and is handed back with ``done_with`` after its last use (``ldm.residency``).

The seed rule: image i of a call with ``seed=s`` starts from
``torch.Generator("cpu").manual_seed(s + i)``, which draws its initial noise of shape
(1, C, H/f, W/f) and every later random number of that image (img2img's posterior sample and noise,
stochastic scheduler steps), so image i of a batch equals a single image made with seed s + i, and a
single image equals diffusers' image for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from ldm import __version__, checks
from ldm.errors import ConfigError, InputError, LdmError, SettingError
from ldm.guidance import ClassifierFreeGuidance, Conditional, Conditioning, Denoiser, EmbeddedGuidance, Network, guided_steps
from ldm.images import image_to_tensor, to_numpy, to_pil
from ldm.pipeline import control, sdxl
from ldm.pipeline.inpaint import Inpainting
from ldm.prompts import encode_prompts as encode_texts
from ldm.prompt_schedule import PromptPlan, plan_prompts
from ldm.prompts import split_lora_tags, words_used
from ldm.random import randn, resolve_seed, seed_generators, slerp
from ldm.schedulers import DiffusersScheduler, NoiseProcess, Scheduler, SchedulerConfig, check_options, check_spacing, create
from ldm.schedulers.config import LINSPACE_DEFAULTS
from ldm.settings import SAMPLER_NAMES, GenerationSettings, ResolvedSettings
from ldm.speedups import speed_up

if TYPE_CHECKING:
    from ldm.adapters.folder import PromptLora
    from ldm.pipeline.pipeline import Pipeline

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
Generators = torch.Generator | list[torch.Generator]
# callback(i, t, latents, denoised) after step i: the new latents and the x_0 the step's network
# output implied (scaled latents; ldm.previews makes a picture of it).
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class NonFiniteOutputError(LdmError):
    """The generated image contains NaN or infinity."""


@dataclass(frozen=True)
class Call:
    """One generation call: its resolved settings and the objects it runs with."""

    resolved: ResolvedSettings
    scheduler: Scheduler | DiffusersScheduler  # built for this call alone
    generators: Generators
    shape: tuple[int, int, int, int]  # of the latents: (images, channels, H / f, W / f)
    init: torch.Tensor | None  # img2img: the init image, (1, 3, H, W) in [-1, 1]
    latents: torch.Tensor | None  # the caller's starting latents
    plan: PromptPlan  # the texts the text encoder reads and which of them each step reads (prompt_plan)
    loras: tuple[PromptLora, ...] = ()  # the LoRAs the prompts' tags name, found and hashed
    variation: list[torch.Generator] | None = None  # the variation seeds' generators (subseed_strength > 0)
    control: tuple[control.PreparedUnit, ...] = ()  # the ControlNets, found, and their control maps
    init_latents: torch.Tensor | None = None  # img2img from latents: z_0 per image, scaled (the hires pass's)
    inpaint: Inpainting | None = None  # a mask, an outpainting or an inpainting U-Net (ldm.pipeline.inpaint)
    kept_steps: int | None = None  # img2img: the steps run at the schedule's end (the hires pass's); None: strength's

    @property
    def img2img(self) -> bool:
        """Whether the call starts from an image or its latents, noised to the first kept timestep."""
        return self.init is not None or self.init_latents is not None

    @property
    def settings(self) -> GenerationSettings:
        return self.resolved.settings


# --- resolve ---------------------------------------------------------------------------------------


def resolve(pipe: Pipeline, settings: GenerationSettings, template: Any, generator: Generators | None, latents: torch.Tensor | None) -> Call:
    """The call's settings filled in from the model and checked against it, before any network runs."""
    from ldm.loading.configs import native_side  # importing the loaders (and transformers) waits for their use

    if settings.init_image is not None and latents is not None:
        raise InputError("give init_image or latents, not both")
    vae = pipe.vae.config
    s = settings.filled(pipe.defaults, native_side(pipe.unet.config, vae), vae.downsample_factor)
    check_embedded_guidance(pipe, s)
    check_composition(pipe, s)
    sdxl.check(pipe, s, latents)
    checks.check_steps(s.num_inference_steps, limit=pipe.scheduler_config.num_train_timesteps)
    checks.check_pixels(s.width, s.height, s.batch, pipe.setup.max_pixels)
    shape = (s.batch, vae.latent_channels, s.height // vae.downsample_factor, s.width // vae.downsample_factor)
    if latents is not None and tuple(latents.shape) != shape:
        raise InputError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
    if latents is not None and s.subseed_strength:
        raise SettingError("{subseed_strength} leans the seeds' noise toward the variation seeds'; with {latents} there is none: drop one")
    seeds, generators = seeds_and_generators(generator, s.seed, s.batch, varied=s.subseed_strength > 0)
    subseed, variation = variation_generators(s)
    scheduler = build_scheduler(pipe.scheduler_config, s, template)
    loras = find_loras(pipe, s)
    plan = prompt_plan(pipe, s)
    texts = [*plan.texts, *(text for text in (*(s.prompt_2 or ()), *(s.negative_prompt_2 or ())) if text)]  # SDXL's bigG texts
    pipe.embeddings.check_not_skipped(texts)
    used = words_used(pipe.embeddings.tokenizer, texts, pipe.prompt_words())  # a refiner has tokenizer_2 alone
    inpaint = Inpainting.for_call(pipe, s)
    units = control.prepare(pipe, s, inpaint.crop if inpaint is not None else None)
    resolved = ResolvedSettings(
        replace(s, seed=seeds[0] if seeds else None, subseed=subseed), seeds, sampler_name(scheduler),
        pipe.name, pipe.model_hash, tuple(pipe.adapters), __version__, vae=pipe.vae_name,
        lora_hashes=tuple((lora.infotext_name, lora.hash) for lora in loras),
        embeddings=tuple((name, pipe.embeddings.short_hash(name)) for name in used),
        controlnets=tuple(unit.label for unit in units),
        refiner=pipe.refiners.label(pipe, s.refiner) if s.refiner is not None else None,
    )
    return Call(resolved, scheduler, generators, shape, init_tensor(s), latents, plan, loras, variation, control=units, inpaint=inpaint)


def find_loras(pipe: Pipeline, s: GenerationSettings) -> tuple[PromptLora, ...]:
    """The file and hash of each LoRA tag of the prompts (shared by all of them), from the pipeline's LoRA folder."""
    tags = s.lora_tags()
    if not tags:
        return ()
    from ldm.adapters.folder import prompt_loras

    return prompt_loras(pipe.setup.loras_dir, tags)


def init_tensor(s: GenerationSettings) -> torch.Tensor | None:
    """The init image as (1, 3, H, W) in [-1, 1], resized to the call's size (None for txt2img)."""
    if s.init_image is None or isinstance(s.init_image, torch.Tensor):
        if s.init_image is not None and (s.init_image.ndim != 4 or s.init_image.shape[:2] != (1, 3)):
            raise InputError(f"init_image tensor must have shape (1, 3, H, W) in [-1, 1], got {tuple(s.init_image.shape)}")
        return s.init_image
    return image_to_tensor(s.init_image, s.width, s.height)


def seeds_and_generators(
    generator: Generators | None, seed: int | None, batch: int, varied: bool = False
) -> tuple[tuple[int, ...] | None, Generators]:
    """Each image's seed and generator (the seed rule: image i gets seed + i), or the caller's generators (seeds
    unknown). ``varied`` (variation seeds on): every image keeps the first seed, as A1111 keeps it, and only
    the variation seeds count up, so the images are variations of one."""
    if generator is not None:
        if seed is not None:
            raise InputError("give either seed or generator, not both")
        if isinstance(generator, list) and len(generator) != batch:
            raise InputError(f"got {len(generator)} generators for {batch} images; give one per image")
        return None, generator
    first = resolve_seed(seed, batch)
    seeds = tuple(first + (0 if varied else i) for i in range(batch))
    return seeds, [seed_generators(one, 1)[0] for one in seeds]


def variation_generators(s: GenerationSettings) -> tuple[int | None, list[torch.Generator] | None]:
    """The first variation seed (A1111's subseed) and a generator per image, when the call leans toward it."""
    if not s.subseed_strength:
        return s.subseed, None
    first = resolve_seed(s.subseed, s.batch, "subseed")
    return first, seed_generators(first, s.batch)


def build_scheduler(config: SchedulerConfig, s: GenerationSettings, template: Any) -> Scheduler | DiffusersScheduler:
    """A new scheduler for this call, so that calls (threads, a callback that calls again) share no state.

    Built by name from the model's scheduler config and the call's options, or from a template: one
    of ours or one of diffusers' scheduler objects, whose own config and options are used.
    """
    options = s.scheduler_options()
    if template is None:
        check_options(s.scheduler, options)
        check_spacing(s.scheduler, s.timestep_spacing)
        if s.timestep_spacing is not None:
            config = config.with_values(timestep_spacing=s.timestep_spacing)
        return create(s.scheduler, config, **options)
    if options or s.timestep_spacing is not None:
        raise SettingError(
            "{eta}, {timestep_spacing} and {sigma_schedule} configure a scheduler named by its string; "
            "pass them when building the scheduler object"
        )
    if isinstance(template, Scheduler):
        return type(template)(template.config, **asdict(template.options))
    from ldm.schedulers import from_diffusers_scheduler

    template = template if isinstance(template, DiffusersScheduler) else from_diffusers_scheduler(template)
    return from_diffusers_scheduler(type(template.diffusers).from_config(template.diffusers.config))


def sampler_name(scheduler: Scheduler | DiffusersScheduler) -> str:
    """The scheduler as image metadata names it (A1111's "Sampler"): A1111's name for ours, the class name for diffusers'."""
    if isinstance(scheduler, DiffusersScheduler):
        return type(scheduler.diffusers).__name__
    from ldm.schedulers import SCHEDULERS

    names = [name for name, cls in SCHEDULERS.items() if type(scheduler) is cls]
    return SAMPLER_NAMES.get(names[0], names[0]) if names else type(scheduler).__name__


# --- LoRA tags, encode, timesteps, latents ---------------------------------------------------------


def apply_loras(pipe: Pipeline, call: Call) -> None:
    """Make the call's tagged LoRAs the pipeline's tag-loaded adapters (none, for a call without tags);
    adapters loaded by name (``load_lora``) are left as they are."""
    pipe.set_prompt_loras(call.loras)


def encode_prompts(pipe: Pipeline, call: Call, last_use: bool = True) -> Conditioning:
    """The text states of each image at each step; unconditional ones only with guidance.

    One text-encoder pass encodes the texts of the prompts' schedules (without their LoRA tags) and
    the negatives' together, so all get the same number of 77-token chunks; a prompt without editing,
    alternation or ``AND`` is encoded as it is, in diffusers' batch order (``ldm.prompt_schedule.plan_prompts``).
    """
    if sdxl.is_sdxl(pipe):  # both encoders, the pooled embedding and the micro-conditioning
        return sdxl.encode_prompts(pipe, call, last_use)
    s, plan = call.settings, call.plan
    with pipe.residency.running(pipe.text_encoder) as text_encoder:
        states = encode_texts(text_encoder, pipe.tokenizer, list(plan.texts), clip_skip=s.clip_skip, words=pipe.prompt_words())
    if last_use:  # else a later stage encodes again (a hires pass with its own prompt schedule)
        pipe.residency.done_with(pipe.text_encoder)
    states = states.to(pipe.device, pipe.dtype)

    def per_image(rows) -> torch.Tensor:  # (steps, images): prompt p's rows for each of its images
        return torch.tensor(rows, device=pipe.device).T.repeat_interleave(s.num_images_per_prompt, dim=1)

    cond = torch.cat([per_image(part) for part in plan.cond], dim=1)
    uncond = per_image(plan.uncond) if plan.uncond is not None else None
    n = s.num_images_per_prompt
    weights = None if plan.weights is None else tuple(tuple(w for w in part for _ in range(n)) for part in plan.weights)
    return Conditioning(states, cond, uncond, weights)


def check_composition(pipe: Pipeline, s: GenerationSettings) -> None:
    """Refuse sub-prompts (``AND``, a trailing ``:weight``) where guidance cannot combine them: they are summed
    over the unconditional pass (A1111's ``combine_denoised``), so it must run at every step, unrescaled."""
    if not s.composed():
        return
    if not s.guided or embeds_guidance(pipe):
        raise SettingError(
            "{prompt} has sub-prompts or a weight (AND, or a trailing :number), which classifier-free guidance "
            "combines; raise {guidance_scale} above 1 (a model that embeds the scale has no such pass)"
        )
    if s.guidance_fraction < 1 or s.guidance_rescale > 0:
        raise SettingError(
            "{prompt} has sub-prompts or a weight (AND, or a trailing :number), which guidance combines at every "
            "step; drop {guidance_fraction} and {guidance_rescale}"
        )


def prompt_plan(pipe: Pipeline, s: GenerationSettings) -> PromptPlan:
    """The texts the text encoder reads for a call and which of them each step reads: the prompts' schedules
    (editing, alternation, ``AND``; without their LoRA tags), then the negatives' when it is guided."""
    guided = s.guided and not embeds_guidance(pipe)
    prompts = [split_lora_tags(text)[0] for text in s.prompt]
    return plan_prompts(prompts, list(s.negative_prompt) if guided else None, s.num_inference_steps)


def embeds_guidance(pipe: Pipeline) -> bool:
    """Whether the U-Net takes the guidance scale as an embedding (LCM): one pass, no negative prompt."""
    return pipe.unet.config.time_cond_proj_dim is not None


def check_embedded_guidance(pipe: Pipeline, s: GenerationSettings) -> None:
    """Refuse what a one-pass, guidance-embedding U-Net would ignore: it has no unconditional pass."""
    if embeds_guidance(pipe) and (any(s.negative_prompt) or s.guidance_rescale > 0 or s.guidance_fraction < 1):
        raise SettingError(
            "this model takes the guidance scale as an embedding (LCM) and runs no unconditional pass; "
            "drop {negative_prompt}, {guidance_rescale} and {guidance_fraction}"
        )


def prepare_timesteps(pipe: Pipeline, call: Call) -> torch.Tensor:
    """The timesteps the loop visits (the schedule's, or the call's own); img2img skips the first
    (1 - strength) of them, as diffusers does."""
    s = call.settings
    call.scheduler.set_timesteps(s.num_inference_steps, device=pipe.device, timesteps=s.timesteps, sigmas=s.sigmas)
    timesteps = call.scheduler.timesteps
    if not call.img2img:
        return sdxl.window(call, timesteps, pipe.scheduler_config.num_train_timesteps)
    if len(timesteps) != s.num_inference_steps:
        raise ConfigError(f"img2img needs a scheduler with one timestep per step; {type(call.scheduler).__name__} has {len(timesteps)}")
    kept = call.kept_steps or s.img2img_steps
    return sdxl.window(call, timesteps[s.num_inference_steps - kept :], pipe.scheduler_config.num_train_timesteps)


def initial_latents(pipe: Pipeline, call: Call, timesteps: torch.Tensor) -> torch.Tensor:
    """The loop's start, in fp32 whatever the networks' dtype (the scheduler's arithmetic stays exact)."""
    if call.inpaint is not None:  # z_0, noise and the masked image's latents, in diffusers' inpainting order
        return call.inpaint.start(pipe, call, timesteps, lambda: starting_noise(call, pipe.device))
    sigma = call.scheduler.init_noise_sigma
    if call.latents is not None:  # a base's partly denoised latents (denoising_start) go on as they are
        return call.latents.to(pipe.device, torch.float32) * (1.0 if sdxl.continues(call) else sigma)
    if not call.img2img:
        return starting_noise(call, pipe.device) * sigma
    return noised_init_latents(pipe, call, timesteps[:1])


def starting_noise(call: Call, device: torch.device) -> torch.Tensor:
    """The seeds' noise, each image's leaning toward its variation seed's by ``subseed_strength`` (A1111's
    variation seeds: ``ldm.random.slerp``)."""
    noise = randn(call.shape, call.generators, device, torch.float32)
    if call.variation is None:
        return noise
    toward = randn(call.shape, call.variation, device, torch.float32)
    return torch.stack([slerp(call.settings.subseed_strength, a, b) for a, b in zip(noise, toward)])


def noised_init_latents(pipe: Pipeline, call: Call, first_t: torch.Tensor) -> torch.Tensor:
    """img2img start: z_0 ~ q(z | image) (or the given latents), then q(z_t | z_0) at the first kept timestep.

    Each generator draws the posterior sample's noise (a KL-VAE's; TAESD's encoder is deterministic
    and draws none) and then the forward process noise, in diffusers' order, so seeds give
    diffusers' images.
    """
    z0 = call.init_latents.to(pipe.device, torch.float32) if call.init_latents is not None else encoded_init(pipe, call)
    noise = starting_noise(call, pipe.device)
    return call.scheduler.add_noise(z0, noise, first_t.repeat(call.shape[0]))


def encoded_init(pipe: Pipeline, call: Call) -> torch.Tensor:
    """z_0 ~ q(z | init image), scaled, one per image: the encoder in tiles with ``decode_mode="tiled"``."""

    def posterior_noise() -> torch.Tensor:
        return randn(call.shape, call.generators, pipe.device, torch.float32)

    posterior = encode_image(pipe, call.init)
    return posterior.sample_with(posterior_noise).float().expand(call.shape) * pipe.vae.config.scaling_factor


def encode_image(pipe: Pipeline, image: torch.Tensor) -> Any:
    """The VAE's posterior q(z | image) of (B, 3, H, W) pixels in [-1, 1], encoded as the set-up says: in tiles with
    ``decode_mode="tiled"``, in fp32 for a VAE with ``force_upcast`` in an fp16 pipeline (as diffusers' SDXL img2img).
    Every encode of a call (img2img, the hires pass's images, inpainting's image and masked image) goes through here."""
    dtype = torch.float32 if pipe.dtype == torch.float16 and pipe.vae.config.force_upcast else pipe.dtype
    with pipe.residency.running(pipe.vae) as vae, in_fp32(vae, pipe.dtype) if dtype != pipe.dtype else nullcontext():
        encode = vae.encode_tiled if pipe.setup.decode_mode == "tiled" else vae.encode
        return encode(image.to(pipe.device, dtype, memory_format=pipe.memory_formats.vae))


# --- denoise ---------------------------------------------------------------------------------------


def denoise(
    pipe: Pipeline, call: Call, x: torch.Tensor, timesteps: torch.Tensor, text: Conditioning, callback: StepCallback | None
) -> torch.Tensor:
    """The sampling loop: one denoiser call and one scheduler step per timestep."""
    s = call.settings
    text = text.from_step(sdxl.steps_before(call, pipe.scheduler_config.num_train_timesteps))  # a refiner goes on
    if text.scheduled and len(timesteps) > s.num_inference_steps:
        raise SettingError(
            "prompt editing and alternation count one network call per step, but this {scheduler} makes "
            f"{len(timesteps)} calls for {s.num_inference_steps} steps; use a one-call sampler or a plain prompt"
        )
    # The callback's x_0 comes from the model's noise process (built only when someone listens).
    process = NoiseProcess.from_config(pipe.scheduler_config.filled_for(LINSPACE_DEFAULTS)) if callback else None
    last_use = s.hires_scale is None  # else the hires pass (ldm.pipeline.hires) runs the networks again
    with pipe.residency.running(pipe.unet) as unet, control.running(pipe, call.control, last_use):
        network = speed_up(unet, s.deepcache_interval, s.token_merging)
        if call.inpaint is not None:  # an inpainting U-Net's extra inputs (a ControlNet sees the latents alone)
            network = call.inpaint.network(network)
        network = control.controlled(network, call.control, text, sdxl.control_steps(call, timesteps), pipe.dtype)
        network = in_network_format(network, pipe.dtype, pipe.memory_formats.unet)
        denoiser = guided(network, s, text, len(timesteps), unet.config.time_cond_proj_dim)
        for i, t in enumerate(timesteps):
            model_input = call.scheduler.scale_model_input(x, t)
            output = denoiser(model_input, t)
            x = call.scheduler.step(output, t, x, generator=call.generators)
            if call.inpaint is not None:  # an ordinary U-Net's known region put back
                x = call.inpaint.after_step(i, x)
            if callback is not None:
                step_done(pipe, call, callback, i, t, x, process.denoised(output, model_input, t))
    if last_use:
        pipe.residency.done_with(pipe.unet)
    return x


class Stopped(Exception):
    """Raised by a step callback to end its call after that step (the server's interrupt). It leaves the loop
    carrying ``partial(output_type)``: the images the call would make from that step's x_0 estimate
    (``partial_output``), as A1111 keeps an interrupted batch's images."""

    partial: Callable[..., Any] | None = None


def step_done(
    pipe: Pipeline, call: Call, callback: StepCallback, i: int, t: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor
) -> None:
    """Tell ``callback`` step i is done; a ``Stopped`` it raises gets this step's partial result."""
    try:
        callback(i, t, x, denoised)
    except Stopped as stop:
        stop.partial = lambda output_type="pil": partial_output(pipe, call, denoised, output_type)
        raise


@torch.inference_mode()
def partial_output(pipe: Pipeline, call: Call, denoised: torch.Tensor, output_type: OutputType = "pil") -> Any:
    """A stopped call's images from a step's x_0 estimate ``denoised``, made as ``decode_output`` makes the finished
    ones: an ordinary U-Net's known region put back first (A1111 blends its sampler's result so), then decoded and,
    for inpainting, pasted over the init image (the output's size; unmasked pixels the init image's)."""
    if call.inpaint is not None:
        denoised = call.inpaint.blended(denoised)
    return decode_output(pipe, denoised, output_type, call.inpaint)


def guided(
    network: Network, s: GenerationSettings, text: Conditioning, steps: int, guidance_embedding_dim: int | None = None
) -> Denoiser:
    """The call's denoiser: the guidance scale embedded in one pass (a U-Net with a ``guidance_embedding_dim``),
    classifier-free guidance over ``network``, or its conditional pass alone."""
    if guidance_embedding_dim is not None:
        return EmbeddedGuidance(network, text, s.guidance_scale, guidance_embedding_dim)
    if text.uncond is None:
        return Conditional(network, text)
    window = guided_steps(s.guidance_fraction, steps)
    return ClassifierFreeGuidance(network, text, s.guidance_scale, s.guidance_rescale, window)


def in_network_format(network: Network, dtype: torch.dtype, memory_format: torch.memory_format) -> Network:
    """``network`` taking the scheduler's fp32 latents and giving fp32 outputs, whatever its own dtype."""

    def run(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        return network(x.to(dtype, memory_format=memory_format), t, text, **conditions).float()

    return run


# --- decode ----------------------------------------------------------------------------------------


def decode_output(pipe: Pipeline, x: torch.Tensor, output_type: OutputType, inpaint: Inpainting | None = None) -> Any:
    """The call's images: the latents themselves, or decoded as tensors, arrays or PIL images (an inpainting's laid
    over its original image)."""
    if output_type == "latent":
        pipe.residency.done_with(pipe.vae)
        return x
    images = decode(pipe, x)
    if inpaint is not None:
        images = inpaint.paste(images)
    pipe.residency.done_with(pipe.vae)
    return {"pt": lambda images: images, "np": to_numpy, "pil": to_pil}[output_type](images)


def decode(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1]; in fp32 if the VAE asks it of fp16 runs (``force_upcast``, SDXL's),
    else retried in fp32 if fp16 overflowed; raises on NaN / inf."""
    z = latents / pipe.vae.config.scaling_factor
    fp16 = pipe.dtype == torch.float16
    with pipe.residency.running(pipe.vae) as vae:
        if fp16 and vae.config.force_upcast:
            images = _decode_in_fp32(vae, pipe.setup.decode_mode, z, pipe.dtype)
        else:
            images = _decoder(vae, pipe.setup.decode_mode)(z.to(pipe.dtype, memory_format=pipe.memory_formats.vae))
            if not torch.isfinite(images).all() and fp16 and torch.isfinite(latents).all():
                # The SD VAE's decoder activations exceed fp16's range (65504) on some images.
                images = _decode_in_fp32(vae, pipe.setup.decode_mode, z, pipe.dtype)
    if not torch.isfinite(images).all():
        raise NonFiniteOutputError(non_finite_cause(latents, pipe.dtype))
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _decode_in_fp32(vae: torch.nn.Module, mode: str, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Decode with the VAE's weights in fp32 for this call, then back in ``dtype`` (diffusers' ``upcast_vae``)."""
    with in_fp32(vae, dtype):
        return _decoder(vae, mode)(z.float())


@contextmanager
def in_fp32(vae: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The VAE's weights in fp32 for the block, then back in ``dtype`` (an fp16 run's overflow-prone encode or decode)."""
    vae.float()
    try:
        yield
    finally:
        vae.to(dtype)


def _decoder(vae: torch.nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The VAE's decoder run whole, one image at a time, or in overlapping tiles."""
    if mode == "tiled":
        return vae.decode_tiled
    return vae.decode_sliced if mode == "sliced" else vae.decode


def non_finite_cause(latents: torch.Tensor, dtype: torch.dtype) -> str:
    """The one-line report for an image with NaN or infinity, naming the likely cause."""
    if not torch.isfinite(latents).all():
        if dtype == torch.float16:
            return "the latents became NaN/inf during denoising: the U-Net overflowed float16; use --dtype bf16 or fp32"
        return "the latents became NaN/inf during denoising: the model weights or the guidance scale are likely broken"
    return "the VAE decoded NaN/inf from finite latents: the VAE weights are likely broken; try another VAE or --dtype fp32"


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise SettingError(f"{{output_type}} must be one of {', '.join(OUTPUT_TYPES)}; got {checks.shown(output_type)}")
