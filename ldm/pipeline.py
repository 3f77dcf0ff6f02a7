"""Text-to-image (and image-to-image) with a latent diffusion model.

    from ldm import Pipeline
    pipe = Pipeline.from_pretrained("path/to/model")          # diffusers folder or .safetensors / .ckpt
    result = pipe("a watercolor fox", negative_prompt="blurry", seed=42, num_images_per_prompt=2)
    result.save("outputs")   # [outputs/00000-42.png, outputs/00001-43.png], settings in each PNG
    result.seeds             # [42, 43]

``Pipeline.__call__`` is one function in numbered stages (encode prompts, set
timesteps, prepare latents, denoise with classifier-free guidance, decode) and
does numerically what diffusers' ``StableDiffusionPipeline`` and
``StableDiffusionImg2ImgPipeline`` do, so the same weights, prompt, seed,
scheduler and steps give the same image.

The seed rule: image i of a call with ``seed=s`` starts from
``torch.Generator("cpu").manual_seed(s + i)``, which draws its initial noise of
shape (1, 4, H/8, W/8) and every later random number of that image (img2img's
posterior sample and noise, stochastic scheduler steps). So image i of a batch
equals a single image made with seed s + i, whatever the batch size, and a
single image equals diffusers' image for the same seed. ``seed=None`` or ``-1`` draws a random
seed (``ldm.random.resolve_seed``), reported in ``.seeds``.

Every setting is checked before any work (``ldm.checks``, the same checks ``ldm txt2img`` makes),
and a batch of more than ``pipe.max_pixels`` pixels is refused before it is allocated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm import checks
from ldm.errors import CheckpointError, ConfigError, InputError, LdmError
from ldm.images import (
    A1111_SAMPLER_NAMES,
    GenerationParameters,
    check_output_folder,
    image_to_tensor,
    init_image_size,
    read_image,
    save_png,
    to_numpy,
    to_pil,
    to_rgb,
)
from ldm.models.deepcache import DeepCacheUNet
from ldm.models.tome import token_merging as merged_tokens
from ldm.paging import release_to_page_cache
from ldm.prompts import check_prompt, encode_prompts
from ldm.random import randn, resolve_seed, seed_generators
from ldm.schedulers import SCHEDULERS, DiffusersScheduler, Scheduler, SchedulerConfig, create
from ldm.schedulers.noise import TimestepSpacing

OutputType = Literal["pil", "np", "pt", "latent"]
VaeDecode = Literal["full", "sliced", "tiled"]
WeightsAfterUse = Literal["page-out", "keep", "release"]  # see Pipeline.weights_after_use
Generators = torch.Generator | list[torch.Generator]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

DEFAULT_SCHEDULER = "dpm-solver++"  # DPM-Solver++(2M) converges in 20-25 steps (Lu et al. 2022b, sec. 6)
DEFAULT_STEPS = 25
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class NonFiniteOutputError(LdmError):
    """The generated image contains NaN or infinity."""


@dataclass(frozen=True)
class GenerationDefaults:
    """The settings a call uses when it does not give them.

    A model folder may recommend its own in ``generation_config.json`` (as transformers' models do
    for text generation): a model trained on simple data can need less guidance than SD's 7.5.
    ``ldm.loading`` reads and checks it for folders and single files alike (``Components.generation_config``).
    """

    guidance_scale: float = 7.5
    num_inference_steps: int = DEFAULT_STEPS

    def __post_init__(self) -> None:
        # A model's file is checked when it is read, not blamed on every later call.
        checks.check_guidance_scale(self.guidance_scale)
        checks.check_steps(self.num_inference_steps)

    def fill(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """The given steps and guidance, each left as None replaced by its default."""
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        return steps, self.guidance_scale if guidance_scale is None else guidance_scale

    @classmethod
    def of_model(cls, path: Path) -> GenerationDefaults:
        file = path / "generation_config.json"
        if not file.is_file():
            return cls()
        try:
            values = json.loads(file.read_text())
            return cls(**values)
        except (ValueError, TypeError) as error:
            allowed = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"{file}: {error}; it holds a JSON object with some of: {allowed}") from None


class ReleasedWeightsError(LdmError):
    """A network's weights were released after a one-shot call (``release_weights_after_use``)."""


@dataclass
class GenerationOutput:
    """``images`` in the requested ``output_type``; ``seeds[i]`` made image i (None when generators were given).

    ``parameters[i]`` is what made image i (prompt, seed, steps, ...), as ``save`` writes it.
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int] | None
    parameters: list[GenerationParameters] | None = None

    def save(self, folder: str | Path, extra: dict[str, str] | None = None) -> list[Path]:
        """Write each image as ``folder/NNNNN-<seed>.png`` with its settings in the A1111 ``parameters`` chunk.

        The files ``ldm txt2img`` writes; nothing is overwritten. ``extra`` adds A1111 keys
        (e.g. ``{"Lora": "style: 0.8"}``). Returns the paths, in image order.
        """
        if not isinstance(self.images, list):
            raise InputError("save() writes PIL images; make them with output_type='pil' (the default)")
        if self.parameters is None:
            raise InputError("these images were made with generator=, so their seeds are unknown; pass seed= to save them")
        check_output_folder(folder)
        return [
            save_png(image, folder, replace(params, extra={**params.extra, **(extra or {})}))
            for image, params in zip(self.images, self.parameters)
        ]


class Pipeline:
    """U-Net, VAE, CLIP text encoder and tokenizer, plus the scheduler config they were trained with."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler_config: SchedulerConfig):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config  # each call builds its own sampler from it
        self.name = "model"  # shown as "Model" in image metadata; from_pretrained sets the folder / file stem
        self.vae_decode: VaeDecode = "full"  # "sliced": one image at a time; "tiled": overlapping tiles
        self.device = next(unet.parameters()).device  # where the networks run
        self.dtype = next(unet.parameters()).dtype
        self.offload_device: torch.device | None = None  # set by enable_model_cpu_offload
        self.channels_last = False  # set by enable_channels_last
        # After each network's stage: "page-out" hands its memory-mapped weights back to the page cache
        # (ldm.paging), "keep" leaves them resident, "release" frees them (one-shot calls).
        self.weights_after_use: WeightsAfterUse = "page-out"
        self.defaults = GenerationDefaults()  # from_pretrained reads the model's own, if it has any
        # Largest batch a call may make, in pixels (width x height x images); ldm txt2img --max-pixels.
        self.max_pixels = checks.MAX_PIXELS

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None,
        config: str | Path | None = None,
    ) -> Pipeline:
        """Load a diffusers folder or a single ``.safetensors`` / ``.ckpt`` (default: the project's model).

        ``config``: a diffusers folder whose configuration describes a single file that carries none
        (see ``ldm.loading.load_components``).
        """
        from ldm.loading import DEFAULT_MODEL_DIR, load_components

        if path is None:
            if not Path(DEFAULT_MODEL_DIR).exists():
                raise CheckpointError(f"the default model is not installed at {DEFAULT_MODEL_DIR}; pass a model folder or file")
            path = DEFAULT_MODEL_DIR
        device = torch.device(device or "cpu")
        dtype = dtype or torch.float32
        check_dtype(dtype, device)
        parts = load_components(path, device=device, dtype=dtype, prediction_type=prediction_type, config=config)
        pipe = cls(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler_config)
        pipe.name = parts.name or (Path(path).stem if Path(path).is_file() else Path(path).name)
        pipe.defaults = GenerationDefaults(**parts.generation_config)  # checked by the loader
        return pipe

    # --- set-up ------------------------------------------------------------------------------------

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move all networks to ``device`` and cast them to ``dtype``."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        check_dtype(dtype, device)
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        return self

    def set_attention(self, backend: Literal["sdpa", "xformers", "sliced"], slice_size: int | None = None) -> None:
        """Attention backend of the U-Net and VAE; ``"sliced"`` bounds memory by ``slice_size`` heads at a time."""
        self.unet.set_attention(backend, slice_size)
        self.vae.set_attention(backend, slice_size)

    def enable_model_cpu_offload(self, device: torch.device | str) -> None:
        """Keep the networks on the CPU and move each to ``device`` only while it runs (for small GPUs)."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to("cpu")
        self.offload_device = torch.device("cpu")
        self.device = torch.device(device)

    def load_lora(self, path: str | Path, scale: float = 1.0, fuse: bool = False) -> None:
        """Apply a LoRA file to the U-Net and text encoder (see ``ldm.lora``)."""
        from ldm.lora import apply_lora

        apply_lora(self.unet, self.text_encoder, path, scale=scale, fuse=fuse)

    def release_weights_after_use(self) -> None:
        """Make the next call a one-shot: each network's weights are freed as soon as its stage is done.

        The text encoder is released after the prompts are encoded, the U-Net after the last
        denoising step, the VAE after decoding (as stable-diffusion.cpp's CLI does). Weights loaded
        from safetensors in their own dtype are memory-mapped and become resident only when a network
        first runs, so the call's peak memory is about the U-Net's weights plus its activations
        instead of all weights at once. The pipeline cannot generate again afterwards (a later call
        raises ``ReleasedWeightsError``); ``ldm txt2img`` uses this when it makes a single call.
        """
        self.weights_after_use = "release"

    @contextmanager
    def _running(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` on the execution device for the duration of the block (a no-op without offload)."""
        if self.offload_device is None:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(self.offload_device)

    def _done_with(self, module: nn.Module) -> None:
        """The end of ``module``'s last stage in this call: page its weights out or free them, as asked."""
        if self.weights_after_use == "page-out":
            # Only file-mapped weights the process never wrote are unmapped; they map again on next use.
            release_to_page_cache(module)
        elif self.weights_after_use == "release":
            # The meta device holds no data: the parameters' storage (and the file mapping they
            # view) is freed once nothing else refers to it.
            module.to("meta")

    def _check_loaded(self, *modules: nn.Module) -> None:
        # A module without parameters (a stand-in network in tests) has nothing to release.
        if any(next(module.parameters(), torch.empty(0)).is_meta for module in modules):
            raise ReleasedWeightsError(
                "this pipeline released its weights after its one-shot call; load it again with Pipeline.from_pretrained"
            )

    # --- generation --------------------------------------------------------------------------------

    def enable_channels_last(self, enabled: bool = True) -> None:
        """Keep the U-Net's weights and activations in channels-last (NHWC) memory format (see docs/performance.md)."""
        self.unet.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = enabled

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        scheduler: str | Scheduler | Any | None = None,
        eta: float | None = None,
        timestep_spacing: TimestepSpacing | None = None,
        use_karras_sigmas: bool = False,
        generator: Generators | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        init_image: Image.Image | str | Path | torch.Tensor | None = None,
        strength: float = 0.8,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        output_type: OutputType = "pil",
        callback: StepCallback | None = None,
        guidance_fraction: float = 1.0,
        deepcache_interval: int = 1,
        token_merging: float = 0.0,
    ) -> GenerationOutput:
        """Generate images; see the module docstring and docs/generating.md for every argument.

        ``scheduler`` is a name from ``ldm.schedulers.SCHEDULERS`` (built with this
        model's scheduler config, ``timestep_spacing`` in place of the model's if given,
        and the options ``eta`` and ``use_karras_sigmas`` if given), or one of our or
        diffusers' scheduler objects as a template (the call builds its own from it).
        ``guidance_scale <= 1`` runs the conditional pass alone. ``init_image`` with
        ``strength`` in (0, 1] turns this into img2img. ``callback(i, t, latents)`` is called after each step. Steps and guidance
        left as None come from ``self.defaults`` (25 and 7.5 unless the model recommends others).

        Speed-ups (docs/performance.md), exact at their defaults: ``guidance_fraction``
        runs the unconditional pass only in the first ``ceil(fraction * steps)``
        steps; ``deepcache_interval`` > 1 runs the deep U-Net only every that many
        steps (DeepCache); ``token_merging`` merges that fraction of the tokens in the
        full-resolution self-attention (ToMe).
        """
        self._check_loaded(self.text_encoder, self.unet, self.vae)
        num_inference_steps, guidance_scale = self.defaults.fill(num_inference_steps, guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("the prompt list is empty; give at least one prompt")
        negatives = self._negative_prompts(negative_prompt, len(prompts))
        for text in prompts:
            check_prompt(text, "prompt")
        for text in negatives:
            check_prompt(text, "negative_prompt")
        if init_image is not None and latents is not None:
            raise InputError("give init_image or latents, not both")
        checks.check_steps(num_inference_steps, limit=self.scheduler_config.num_train_timesteps)
        check_settings(
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, strength=strength, eta=eta, clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt, guidance_fraction=guidance_fraction,
            deepcache_interval=deepcache_interval, token_merging=token_merging, output_type=output_type,
        )
        batch = len(prompts) * num_images_per_prompt
        if init_image is not None and not isinstance(init_image, torch.Tensor):
            init_image = read_image(init_image) if not isinstance(init_image, Image.Image) else to_rgb(init_image)
        width, height = self._size(init_image, width, height)
        checks.check_pixels(width, height, batch, self.max_pixels, "pipe.max_pixels")
        factor = self.vae.config.downsample_factor
        shape = (batch, self.vae.config.latent_channels, height // factor, width // factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise InputError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        kept = min(int(num_inference_steps * strength), num_inference_steps)  # img2img's steps
        if init_image is not None and kept == 0:
            raise InputError(f"strength {strength} x {num_inference_steps} steps leaves no step to run; raise either")
        init = self._init_tensor(init_image, width, height) if init_image is not None else None
        seeds, generators = self._generators(generator, seed, batch)
        guided = guidance_scale > 1.0
        sampler = self._scheduler(scheduler, eta, timestep_spacing, use_karras_sigmas)

        # 1. Encode prompts: one text-encoder pass for the prompts and negative prompts together, so long
        #    prompts and their negatives get the same number of 77-token chunks; diffusers' batch order.
        with self._running(self.text_encoder) as text_encoder:
            texts = prompts + negatives if guided else prompts
            embeddings = encode_prompts(text_encoder, self.tokenizer, texts, clip_skip=clip_skip)
        self._done_with(self.text_encoder)
        embeddings = embeddings.to(self.device, self.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        cond, uncond = embeddings[:batch], embeddings[batch:]
        context = torch.cat([uncond, cond]) if guided else cond

        # 2. Set timesteps; img2img skips the first (1 - strength) of them, as diffusers does.
        sampler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = sampler.timesteps
        if init is not None:
            if len(timesteps) != num_inference_steps:
                raise ConfigError(f"img2img needs a scheduler with one timestep per step; {type(sampler).__name__} has {len(timesteps)}")
            timesteps = timesteps[num_inference_steps - kept :]

        # 3. Prepare latents (kept in fp32 whatever the network dtype, so the scheduler's arithmetic is exact).
        if latents is not None:
            x = latents.to(self.device, torch.float32) * sampler.init_noise_sigma
        elif init is None:
            x = randn(shape, generators, self.device, torch.float32) * sampler.init_noise_sigma
        else:
            x = self._noised_init_latents(init, sampler, timesteps[:1], shape, generators)

        # 4. Denoise with classifier-free guidance (Ho & Salimans 2022, eq. 6): both passes in one U-Net call,
        #    for the first ``guided_steps`` steps (guidance truncation), the conditional pass alone after.
        guided_steps = math.ceil(guidance_fraction * len(timesteps)) if guided else 0
        with self._running(self.unet) as unet, merged_tokens(unet, token_merging):
            model = DeepCacheUNet(unet, deepcache_interval) if deepcache_interval > 1 else unet
            for i, t in enumerate(timesteps):
                both = i < guided_steps
                # One latent row serves both passes: the U-Net repeats it where it meets the text.
                model_input = sampler.scale_model_input(x, t)
                model_input = model_input.to(self.dtype, memory_format=self._memory_format)
                output = model(model_input, t, context if both else cond).float()
                if both:
                    out_uncond, out_cond = output.chunk(2)
                    output = out_uncond + guidance_scale * (out_cond - out_uncond)
                    if guidance_rescale > 0:
                        output = rescale_guidance(output, out_cond, guidance_rescale)
                x = sampler.step(output, t, x, generator=generators)
                if callback is not None:
                    callback(i, t, x)
        self._done_with(self.unet)

        # 5. Decode.
        if output_type == "latent":
            self._done_with(self.vae)
            return GenerationOutput(x, seeds)
        images = self.decode_latents(x)
        self._done_with(self.vae)
        if output_type == "pt":
            return GenerationOutput(images, seeds)
        if output_type == "np":
            return GenerationOutput(to_numpy(images), seeds)
        if seeds is None:
            return GenerationOutput(to_pil(images), seeds)
        used = GenerationParameters(
            prompt="",
            negative_prompt="",
            steps=num_inference_steps,
            sampler=sampler_name(sampler),
            cfg_scale=guidance_scale,
            seed=0,
            width=width,
            height=height,
            model=self.name,
            extra=extra_parameters(
                strength if init is not None else None, clip_skip, eta, timestep_spacing, use_karras_sigmas,
                guidance_rescale, guidance_fraction, deepcache_interval, token_merging,
            ),
        )
        parameters = [
            replace(used, prompt=prompts[i // num_images_per_prompt], negative_prompt=negatives[i // num_images_per_prompt], seed=s)
            for i, s in enumerate(seeds)
        ]
        return GenerationOutput(to_pil(images), seeds, parameters)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]; retries in fp32 if fp16 overflowed; raises on NaN / inf."""
        self._check_loaded(self.vae)
        z = latents / self.vae.config.scaling_factor
        with self._running(self.vae) as vae:
            images = self._vae_decode(vae, z.to(self.dtype))
            if not torch.isfinite(images).all() and self.dtype == torch.float16 and torch.isfinite(latents).all():
                # The SD VAE's decoder activations exceed fp16's range (65504) on some images.
                vae.float()
                try:
                    images = self._vae_decode(vae, z.float())
                finally:
                    vae.to(self.dtype)
        if not torch.isfinite(images).all():
            raise NonFiniteOutputError(non_finite_cause(latents, self.dtype))
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _vae_decode(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        if self.vae_decode == "tiled":
            return vae.decode_tiled(z)
        if self.vae_decode == "sliced":
            return vae.decode_sliced(z)
        return vae.decode(z)

    # --- helpers of __call__ -----------------------------------------------------------------------

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _negative_prompts(self, negative_prompt: str | list[str] | None, count: int) -> list[str]:
        if negative_prompt is None:
            return [""] * count
        if isinstance(negative_prompt, str):
            return [negative_prompt] * count
        if len(negative_prompt) != count:
            raise InputError(f"got {len(negative_prompt)} negative prompts for {count} prompts; give one per prompt")
        return list(negative_prompt)

    def _size(self, init_image: Image.Image | torch.Tensor | None, width: int | None, height: int | None) -> tuple[int, int]:
        """(width, height) checked: as given, else the init image's rounded down to 8, else the model's native size."""
        factor = self.vae.config.downsample_factor
        if isinstance(init_image, torch.Tensor):
            if init_image.ndim != 4 or init_image.shape[:2] != (1, 3):
                raise InputError(f"init_image tensor must have shape (1, 3, H, W) in [-1, 1], got {tuple(init_image.shape)}")
            height, width = init_image.shape[-2:]
        elif init_image is not None:
            width, height = init_image_size(init_image, width, height, factor)
        from ldm.loading.configs import native_side  # as from_pretrained: the loaders load on use

        native = native_side(self.unet.config, self.vae.config)
        width = native if width is None else width
        height = native if height is None else height
        return checks.check_side(width, "width", factor), checks.check_side(height, "height", factor)

    def _init_tensor(self, image: Image.Image | torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The init image as (1, 3, H, W) in [-1, 1]."""
        return image if isinstance(image, torch.Tensor) else image_to_tensor(image, width, height)

    def _generators(self, generator: Generators | None, seed: int | None, batch: int) -> tuple[list[int] | None, Generators]:
        if generator is not None:
            if seed is not None:
                raise InputError("give either seed or generator, not both")
            if isinstance(generator, list) and len(generator) != batch:
                raise InputError(f"got {len(generator)} generators for {batch} images; give one per image")
            return None, generator
        seed = resolve_seed(seed, batch)
        seeds = [seed + i for i in range(batch)]
        return seeds, seed_generators(seed, batch)

    def _scheduler(
        self,
        scheduler: str | Scheduler | Any | None,
        eta: float | None,
        timestep_spacing: TimestepSpacing | None,
        use_karras_sigmas: bool,
    ) -> Scheduler:
        """A new sampler for this call, so that calls (threads, a callback that calls again) share no state.

        A scheduler object given is a template: the call builds its own from its config and options.
        """
        options = ({} if eta is None else {"eta": eta}) | ({"use_karras_sigmas": True} if use_karras_sigmas else {})
        config = self.scheduler_config
        if timestep_spacing is not None:
            config = config.with_values(timestep_spacing=timestep_spacing)
        if scheduler is None or isinstance(scheduler, str):
            return create(scheduler or DEFAULT_SCHEDULER, config, **options)
        if options or timestep_spacing is not None:
            raise ConfigError(
                "eta, timestep_spacing and use_karras_sigmas configure a scheduler named by its string; "
                "pass them when building the scheduler object"
            )
        if isinstance(scheduler, Scheduler):
            return type(scheduler)(scheduler.config, **asdict(scheduler.options))
        from ldm.schedulers import from_diffusers_scheduler

        template = scheduler if isinstance(scheduler, DiffusersScheduler) else from_diffusers_scheduler(scheduler)
        return from_diffusers_scheduler(type(template.diffusers).from_config(template.diffusers.config))

    def _noised_init_latents(
        self,
        init: torch.Tensor,
        sampler: Scheduler,
        first_t: torch.Tensor,
        shape: tuple[int, ...],
        generators: Generators,
    ) -> torch.Tensor:
        """img2img start: z_0 ~ q(z | image) and then q(z_t | z_0) at the first kept timestep.

        Each generator draws the posterior sample's noise and then the forward
        process noise, in diffusers' order, so seeds give diffusers' images.
        """
        with self._running(self.vae) as vae:
            posterior = vae.encode(init.to(self.device, self.dtype))
        mean, std = posterior.mean.float(), posterior.std.float()
        z0 = mean + std * randn(shape, generators, self.device, torch.float32)
        z0 = z0 * self.vae.config.scaling_factor
        noise = randn(shape, generators, self.device, torch.float32)
        return sampler.add_noise(z0, noise, first_t.repeat(shape[0]))


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2024 ("Common Diffusion Noise Schedules ... are Flawed"), Sec. 3.4, eqs. 15-16.

    Rescale the guided prediction to the per-sample std of the conditional one,
    then mix ``phi`` of it with ``1 - phi`` of the plain guided prediction.
    """
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def check_settings(
    *,
    guidance_scale: float,
    guidance_rescale: float,
    strength: float,
    eta: float | None,
    clip_skip: int | None,
    num_images_per_prompt: int,
    guidance_fraction: float,
    deepcache_interval: int,
    token_merging: float,
    output_type: str,
) -> None:
    """Raise ``InputError`` for a setting of a call that is not finite or out of range (``ldm.checks``)."""
    checks.check_guidance_scale(guidance_scale)
    checks.check_guidance_rescale(guidance_rescale)
    checks.check_strength(strength)
    if eta is not None:
        checks.check_eta(eta)
    if clip_skip is not None:
        checks.check_clip_skip(clip_skip)
    checks.check_count(num_images_per_prompt, "num_images_per_prompt")
    checks.check_guidance_fraction(guidance_fraction)
    checks.check_deepcache_interval(deepcache_interval)
    checks.check_token_merging(token_merging)
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")


def sampler_name(scheduler: Scheduler | DiffusersScheduler) -> str:
    """The scheduler as image metadata names it: A1111's name for ours, the class name for diffusers'."""
    if isinstance(scheduler, DiffusersScheduler):
        return type(scheduler.diffusers).__name__
    names = [name for name, cls in SCHEDULERS.items() if type(scheduler) is cls]
    return A1111_SAMPLER_NAMES.get(names[0], names[0]) if names else type(scheduler).__name__


def extra_parameters(
    strength: float | None,
    clip_skip: int | None,
    eta: float | None,
    timestep_spacing: TimestepSpacing | None,
    use_karras_sigmas: bool,
    guidance_rescale: float,
    guidance_fraction: float,
    deepcache_interval: int,
    token_merging: float,
) -> dict[str, str]:
    """The optional A1111 metadata keys of a call's settings; ``strength`` is None for txt2img."""
    from ldm import __version__

    extra = {}
    if strength is not None:
        extra["Denoising strength"] = f"{strength:g}"
    if clip_skip:
        extra["Clip skip"] = str(clip_skip + 1)  # A1111 counts the last layer as 1, diffusers as 0
    if eta is not None:
        extra["Eta"] = f"{eta:g}"
    if use_karras_sigmas:
        extra["Schedule type"] = "Karras"  # A1111's key and value
    if timestep_spacing is not None:
        extra["Timestep spacing"] = timestep_spacing
    if guidance_rescale:
        extra["Guidance rescale"] = f"{guidance_rescale:g}"
    if deepcache_interval > 1:
        extra["DeepCache interval"] = str(deepcache_interval)
    if guidance_fraction < 1:
        extra["Guidance fraction"] = f"{guidance_fraction:g}"
    if token_merging:
        extra["Token merging ratio"] = f"{token_merging:g}"
    extra["Version"] = f"ldm {__version__}"
    return extra


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """fp16 is for CUDA: CPU kernels in fp16 are hundreds of times slower and some are missing."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 needs a CUDA device; on the CPU use float32 or bfloat16")


def non_finite_cause(latents: torch.Tensor, dtype: torch.dtype) -> str:
    """The one-line report for an image with NaN or infinity, naming the likely cause."""
    if not torch.isfinite(latents).all():
        if dtype == torch.float16:
            return "the latents became NaN/inf during denoising: the U-Net overflowed float16; use --dtype bf16 or fp32"
        return "the latents became NaN/inf during denoising: the model weights or the guidance scale are likely broken"
    return "the VAE decoded NaN/inf from finite latents: the VAE weights are likely broken; try another VAE or --dtype fp32"
