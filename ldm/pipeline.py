"""Text-to-image (and image-to-image) with a latent diffusion model.

    from ldm import Pipeline
    pipe = Pipeline.from_pretrained("path/to/model")          # diffusers folder or .safetensors / .ckpt
    result = pipe("a watercolor fox", negative_prompt="blurry", seed=42, num_images_per_prompt=2)
    result.images[0].save("fox.png"); result.seeds             # [42, 43]

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
single image equals diffusers' image for the same seed.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm.errors import CheckpointError, ConfigError, InputError, LdmError
from ldm.images import image_to_tensor, open_image, to_numpy, to_pil
from ldm.models.deepcache import DeepCacheUNet
from ldm.models.tome import MAX_RATIO as MAX_TOKEN_MERGING
from ldm.models.tome import token_merging as merged_tokens
from ldm.paging import release_to_page_cache
from ldm.prompts import encode_prompts
from ldm.random import randn, seed_generators
from ldm.schedulers import Scheduler, SchedulerConfig, create
from ldm.schedulers.noise import TimestepSpacing

OutputType = Literal["pil", "np", "pt", "latent"]
VaeDecode = Literal["full", "sliced", "tiled"]
WeightsAfterUse = Literal["page-out", "keep", "release"]  # see Pipeline.weights_after_use
Generators = torch.Generator | list[torch.Generator]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

DEFAULT_SCHEDULER = "dpm-solver++"  # DPM-Solver++(2M) converges in 20-25 steps (Lu et al. 2022b, sec. 6)
DEFAULT_STEPS = 25
RANDOM_SEED_RANGE = 2**32  # unseeded runs draw 32-bit seeds, as A1111 and stable-diffusion.cpp do
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


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
    """``images`` in the requested ``output_type``; ``seeds[i]`` made image i (None when generators were given)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int] | None


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
        """Keep the U-Net's weights and activations in channels-last (NHWC) memory format (see the README's Performance section)."""
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
        """Generate images; see the module docstring and the README for every argument.

        ``scheduler`` is a name from ``ldm.schedulers.SCHEDULERS`` (built with this
        model's scheduler config, ``timestep_spacing`` in place of the model's if given,
        and the options ``eta`` and ``use_karras_sigmas`` if given), or one of our or
        diffusers' scheduler objects as a template (the call builds its own from it). ``guidance_scale <= 1`` runs the conditional
        pass alone. ``init_image`` with ``strength`` in (0, 1] turns this into
        img2img. ``callback(i, t, latents)`` is called after each step. Steps and guidance
        left as None come from ``self.defaults`` (25 and 7.5 unless the model recommends others).

        Speed-ups (README: Performance), exact at their defaults: ``guidance_fraction``
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
        if init_image is not None and latents is not None:
            raise InputError("give init_image or latents, not both")
        if not 0 <= guidance_rescale <= 1:
            raise InputError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        init = self._init_image(init_image, width, height) if init_image is not None else None
        if init is not None:
            height, width = init.shape[-2:]
        factor = self.vae.config.downsample_factor
        height = self.unet.config.sample_size * factor if height is None else height
        width = self.unet.config.sample_size * factor if width is None else width
        check_arguments(height, width, factor, num_inference_steps, num_images_per_prompt, strength, output_type)
        check_speedups(guidance_fraction, deepcache_interval, token_merging)
        batch = len(prompts) * num_images_per_prompt
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
            kept = min(int(num_inference_steps * strength), num_inference_steps)
            if kept == 0:
                raise InputError(f"strength {strength} x {num_inference_steps} steps leaves no step to run; raise either")
            timesteps = timesteps[num_inference_steps - kept :]

        # 3. Prepare latents (kept in fp32 whatever the network dtype, so the scheduler's arithmetic is exact).
        shape = (batch, self.vae.config.latent_channels, height // factor, width // factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise InputError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
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
        return GenerationOutput(to_pil(images), seeds)

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

    def _init_image(self, image: Image.Image | str | Path | torch.Tensor, width: int | None, height: int | None) -> torch.Tensor:
        """The init image as (1, 3, H, W) in [-1, 1]; sizes default to the image's, rounded down to a multiple of 8."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 4 or image.shape[:2] != (1, 3):
                raise InputError(f"init_image tensor must have shape (1, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
            return image
        if not isinstance(image, Image.Image):
            image = open_image(image)
        factor = self.vae.config.downsample_factor
        width = width or image.width - image.width % factor
        height = height or image.height - image.height % factor
        if width <= 0 or height <= 0:
            raise InputError(f"init image of {image.width}x{image.height} is too small; it needs at least {factor}x{factor} pixels")
        return image_to_tensor(image, width, height)

    def _generators(self, generator: Generators | None, seed: int | None, batch: int) -> tuple[list[int] | None, Generators]:
        if generator is not None:
            if seed is not None:
                raise InputError("give either seed or generator, not both")
            if isinstance(generator, list) and len(generator) != batch:
                raise InputError(f"got {len(generator)} generators for {batch} images; give one per image")
            return None, generator
        if seed is None:
            seed = secrets.randbelow(RANDOM_SEED_RANGE)
        if not 0 <= seed <= MAX_SEED - batch + 1:
            raise InputError(f"seed {seed} is out of range; use 0 to {MAX_SEED - batch + 1} for {batch} images")
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

        return from_diffusers_scheduler(type(scheduler).from_config(scheduler.config))

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


def check_arguments(
    height: int, width: int, factor: int, steps: int, images_per_prompt: int, strength: float, output_type: str
) -> None:
    """Raise ``InputError`` for sizes, counts and choices the pipeline cannot honour."""
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise InputError(f"height and width must be positive multiples of {factor}, got {width}x{height}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if images_per_prompt < 1:
        raise InputError(f"num_images_per_prompt must be at least 1, got {images_per_prompt}")
    if not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise InputError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")


def check_speedups(guidance_fraction: float, deepcache_interval: int, token_merging: float) -> None:
    """Raise ``InputError`` for speed-up settings out of range."""
    if not 0.0 <= guidance_fraction <= 1.0:
        raise InputError(f"guidance_fraction must be in [0, 1] (1 = guidance at every step), got {guidance_fraction}")
    if not isinstance(deepcache_interval, int) or deepcache_interval < 1:
        raise InputError(f"deepcache_interval must be an integer >= 1 (1 = off), got {deepcache_interval!r}")
    if not 0.0 <= token_merging <= MAX_TOKEN_MERGING:
        raise InputError(f"token_merging must be in [0, {MAX_TOKEN_MERGING}] (0 = off), got {token_merging}")


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
