"""Text-to-image (and image-to-image) with a latent diffusion model.

    from ldm import Pipeline
    pipe = Pipeline.from_pretrained("path/to/model")          # diffusers folder or .safetensors / .ckpt
    result = pipe("a watercolor fox", negative_prompt="blurry", seed=42, num_images_per_prompt=2)
    result.save("outputs")   # [outputs/00000-42.png, outputs/00001-43.png], settings in each PNG
    result.seeds             # [42, 43]

Two ways to configure it: the pipeline's set-up (``pipe.configure(device=..., cpu_offload=True,
decode_mode="tiled", ...)``, see ``PipelineSetup``), the same for every call, and each call's
``GenerationSettings``, which ``__call__`` builds from diffusers-style keywords (and ``ldm txt2img``
and the HTTP API build from theirs). ``generate`` runs the stages of ``ldm.pipeline.stages`` and
does numerically what diffusers' ``StableDiffusionPipeline`` and
``StableDiffusionImg2ImgPipeline`` do, so the same weights, prompt, seed, scheduler and steps give
the same image. Every setting is checked before any work, and a batch of more than
``max_pixels`` pixels is refused before it is allocated.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm import paging
from ldm.errors import CheckpointError, InputError
from ldm.inpainting import Inpaint, as_inpaint
from ldm.images import GenerationParameters, check_output_folder, save_png
from ldm.kernels.choice import PLAIN, bf16_warning
from ldm.models import set_kernels
from ldm.pipeline import hires, sdxl, stages
from ldm.pipeline import refiner as refining
from ldm.pipeline.control import ControlNets
from ldm.pipeline.setup import MemoryFormats, PipelineSetup
from ldm.pipeline.stages import Generators, OutputType, StepCallback
from ldm.residency import Residency, check_loaded
from ldm.schedulers import Scheduler, SchedulerConfig
from ldm.sdxl import SdxlOptions
from ldm.settings import DEFAULT_SCHEDULER, DEFAULTS, GenerationDefaults, GenerationSettings, ResolvedSettings, TimestepSpacing

if TYPE_CHECKING:
    from ldm.adapters import AdapterInfo, Adapters
    from ldm.control import ControlUnit
    from ldm.adapters.folder import PromptLora
    from ldm.adapters.embeddings import Embeddings
    from ldm.adapters.sdxl_embeddings import SdxlEmbeddings
    from ldm.prompts import PromptWord


@dataclass
class GenerationOutput:
    """``images`` in the requested output type, and ``settings``: what made them (seeds, steps, size...)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    settings: ResolvedSettings

    @property
    def seeds(self) -> list[int] | None:
        """Image i's seed (None when the call was given generators instead of a seed)."""
        return list(self.settings.seeds) if self.settings.seeds is not None else None

    @property
    def parameters(self) -> list[GenerationParameters] | None:
        """What made image i, as ``save`` writes it (A1111's infotext); None without seeds."""
        return self.settings.parameters() if self.settings.seeds is not None else None

    def save(self, folder: str | Path, extra: dict[str, str] | None = None) -> list[Path]:
        """Write each image as ``folder/NNNNN-<seed>.png`` with its settings in the A1111 ``parameters`` chunk.

        The files ``ldm txt2img`` writes; nothing is overwritten. ``extra`` adds A1111 keys
        (e.g. ``{"Hires upscale": "2"}``). Returns the paths, in image order.
        """
        if not isinstance(self.images, list):
            raise InputError("save() writes PIL images; make them with output_type='pil' (the default)")
        if self.settings.seeds is None:
            raise InputError("these images were made with generator=, so their seeds are unknown; pass seed= to save them")
        check_output_folder(folder)
        return [
            save_png(image, folder, replace(params, extra={**params.extra, **(extra or {})}))
            for image, params in zip(self.images, self.settings.parameters())
        ]


class Pipeline:
    """U-Net, VAE, CLIP text encoder and tokenizer, plus the scheduler config they were trained with."""

    def __init__(
        self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer, scheduler_config: SchedulerConfig,
        text_encoder_2: nn.Module | None = None, tokenizer_2=None,
    ):  # fmt: skip
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config  # each call builds its own scheduler from it
        self.name = "model"  # shown as "Model" in image metadata; from_pretrained sets the folder / file stem
        self.source: Path | None = None  # the model's file or folder (from_pretrained)
        self.defaults = GenerationDefaults()  # from_pretrained reads the model's own, if it has any
        self.adapters: list[tuple[str, float]] = []  # (name, scale) of each adapter loaded by name, in order: image metadata
        self._adapters: Adapters | None = None  # made by the first load_lora
        self._tag_lock = threading.Lock()  # guards the two below: the calls now running and their tags' LoRAs
        self._tag_calls = 0
        self._tag_key: tuple = ()
        self._tagged: dict[str, tuple[Path, int]] = {}  # adapters the prompts' tags loaded: name -> (file, its mtime)
        self._embeddings: Embeddings | SdxlEmbeddings | None = None  # made by the first load_embeddings
        self.vae_name: str | None = None  # the VAE file or folder that replaced the model's (load_vae)
        self.controlnets = ControlNets()  # loaded by name (load_controlnet), or by the path a call's units name
        # SDXL (ldm.pipeline.sdxl): the second text encoder (the refiner's only one), its tokenizer, the model's
        # force_zeros_for_empty_prompt (from_pretrained reads it), and the refiners loaded (ldm.pipeline.refiner).
        self.text_encoder_2: nn.Module | None = text_encoder_2  # None for SD 1.x/2.x
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = False
        self.refiners = refining.Refiners()
        param = next(unet.parameters())
        # The set-up the networks are in, then the default one applied: the memory format and fast paths
        # for their dtype on this CPU.
        self.setup = PipelineSetup(device=param.device, dtype=param.dtype, channels_last=False, kernels=PLAIN)
        self.kernels = PLAIN  # the fast paths the networks take (setup.kernel_choice when it was last applied)
        self.configure(channels_last=None, kernels=None)
        _warn_if_slow(self.setup)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None,
        config: str | Path | None = None,
        vae: str | Path | None = None,
    ) -> Pipeline:
        """Load a diffusers folder or a single ``.safetensors`` / ``.ckpt`` (default: the project's model).

        ``config``: a diffusers folder whose configuration describes a single file that carries none
        (see ``ldm.loading.load_components``). ``vae``: a VAE file or folder (a KL-VAE or TAESD) used
        instead of the model's own (see ``load_vae``).
        """
        from ldm.loading import DEFAULT_MODEL_DIR, load_components

        if path is None:
            if not Path(DEFAULT_MODEL_DIR).exists():
                raise CheckpointError(f"the default model is not installed at {DEFAULT_MODEL_DIR}; pass a model folder or file")
            path = DEFAULT_MODEL_DIR
        setup = PipelineSetup(device=device or "cpu", dtype=dtype or torch.float32)
        parts = load_components(path, device=setup.device, dtype=setup.dtype, prediction_type=prediction_type, config=config)
        pipe = cls(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler_config, parts.text_encoder_2, parts.tokenizer_2)
        pipe.force_zeros_for_empty_prompt = sdxl.force_zeros_of(Path(path), parts.family)
        pipe.source = Path(path)
        pipe.name = parts.name or (pipe.source.stem if pipe.source.is_file() else pipe.source.name)
        pipe.defaults = GenerationDefaults(**parts.generation_config)  # checked by the loader
        if vae is not None:
            pipe.load_vae(vae)
        return pipe

    # --- set-up ------------------------------------------------------------------------------------

    def configure(self, **changes: Any) -> Pipeline:
        """Change the set-up (``PipelineSetup``'s fields) and apply it to the networks; returns the pipeline."""
        PipelineSetup.check_names(changes)
        old, new = self.setup, replace(self.setup, **changes)
        old_formats = self.memory_formats
        networks = (self.unet, self.vae, *self.text_encoders)
        if (new.device, new.dtype, new.cpu_offload) != (old.device, old.dtype, old.cpu_offload):
            for module in networks:  # paging.convert: the replaced weights' file pages leave memory too
                paging.convert(module, device="cpu" if new.cpu_offload else new.device, dtype=new.dtype)
        if (new.attention, new.attention_slice_size) != (old.attention, old.attention_slice_size):
            self.unet.set_attention(new.attention, new.attention_slice_size)
            self.vae.set_attention(new.attention, new.attention_slice_size)
        if (new.device, new.dtype, new.kernels) != (old.device, old.dtype, old.kernels):
            self.kernels = new.kernel_choice  # measured once per CPU and dtype (cached), read once per change here
            set_kernels(self.unet, self.kernels)
            set_kernels(self.vae, self.kernels)
        formats = new.memory_formats(self.kernels)
        for network, layout, old_layout in zip((self.unet, self.vae), formats, old_formats, strict=True):
            if layout != old_layout:
                paging.convert(network, memory_format=layout)
        if new.dtype != old.dtype:
            _warn_if_slow(new)
        self.setup = new
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move all networks to ``device`` and cast them to ``dtype`` (diffusers' name for it)."""
        return self.configure(device=device if device is not None else self.device, dtype=dtype or self.dtype)

    def enable_model_cpu_offload(self, device: torch.device | str) -> None:
        """Keep the networks on the CPU and move each to ``device`` only while it runs (diffusers' name for it)."""
        self.configure(device=device, cpu_offload=True)

    # --- adapters (ldm.adapters) ------------------------------------------------------------------

    def load_lora(self, path: str | Path, scale: float = 1.0, fuse: bool = False, name: str | None = None) -> str:
        """Apply a LoRA, LoCon, LoHa, LoKr, diff or DoRA file to the U-Net and text encoder(s); returns its name
        (``name``, else the file stem made unique), by which it is rescaled or dropped and named in image
        metadata. ``fuse=True`` merges it into the weights for good (``ldm txt2img --lora`` does)."""
        name = self._adapter_stack().load(path, scale=scale, fuse=fuse, name=name)
        self._sync_adapters()
        return name

    def lora_adapters(self) -> list[AdapterInfo]:
        """The loaded adapters in load order: name, path, scale, kinds, modules changed, fused."""
        return self._adapter_stack().list()

    def set_adapter_scale(self, name: str, scale: float) -> None:
        """Change the strength of a loaded (not fused) adapter without reloading anything."""
        self._adapter_stack().set_scale(name, scale)
        self._sync_adapters()

    def delete_adapters(self, names: str | list[str]) -> None:
        """Drop loaded (not fused) adapters; the weights they changed return to what they were (diffusers' name)."""
        for name in [names] if isinstance(names, str) else names:
            self._adapter_stack().delete(name)
        self._sync_adapters()

    def unload_lora_weights(self) -> None:
        """Drop every adapter that is not fused (diffusers' name); fused ones are part of the weights and stay."""
        self.delete_adapters([info.name for info in self.lora_adapters() if not info.fused])

    def set_prompt_loras(self, loras: tuple[PromptLora, ...]) -> None:
        """Make ``loras`` (a call's ``<lora:...>`` tags, found) the tag-loaded adapters, at their scales and
        applied after the others in tag order: each is loaded on first use and rescaled after, the tag-loaded
        ones not named are dropped; only the modules they touch are recomputed. Adapters loaded with
        ``load_lora`` are never touched. ``generate`` calls it for every call (``stages.apply_loras``)."""
        if not loras and not self._tagged:
            return
        with torch.inference_mode(False):  # the kept originals stay ordinary tensors, which later calls may write
            self._apply_prompt_loras(loras)

    def _apply_prompt_loras(self, loras: tuple[PromptLora, ...]) -> None:
        stack = self._adapter_stack()
        wanted = {lora.adapter_name: lora for lora in loras}
        for name, lora in wanted.items():
            if name not in self._tagged and name in [info.name for info in stack.list()]:
                raise InputError(f"an adapter loaded with load_lora is named {name!r}, which <lora:{lora.tag.name}> needs; rename it")
        for name, source in list(self._tagged.items()):
            if name not in wanted or source != _file_version(wanted[name].path):
                stack.delete(name)
                del self._tagged[name]
        for name, lora in wanted.items():
            te, unet = lora.tag.text_encoder, lora.tag.unet
            if name in self._tagged:
                stack.set_scale(name, unet, text_encoder_scale=te)
            else:
                stack.load(lora.path, scale=unet, text_encoder_scale=te, name=name)
                self._tagged[name] = _file_version(lora.path)
        stack.move_to_end(list(wanted))
        self._sync_adapters()

    def _adapter_stack(self) -> Adapters:
        from ldm.adapters import Adapters

        if self._adapters is None:
            self._adapters = Adapters(self.unet, self.text_encoder, self.text_encoder_2)
        return self._adapters

    def _sync_adapters(self) -> None:
        loaded = self.lora_adapters()
        self._tagged = {name: source for name, source in self._tagged.items() if name in {info.name for info in loaded}}
        self.adapters = [(info.name, info.scale) for info in loaded if info.name not in self._tagged]

    # --- textual-inversion embeddings (ldm.adapters.embeddings) ------------------------------------

    def load_embeddings(self, path: str | Path, name: str | None = None) -> list[str]:
        """Load a textual-inversion embedding file, or every one in a folder (and its subfolders); returns
        the names loaded. A prompt that writes a name (the file's stem, or ``name`` for a file) uses its
        vectors. In a folder, files that do not fit this model are skipped with a warning and listed in
        ``embeddings.skipped``; a single such file raises."""
        check_loaded(*self.text_encoders)
        return self.embeddings.load(path, name)

    @property
    def embeddings(self) -> Embeddings | SdxlEmbeddings:
        """The loaded embeddings (``loaded``: name -> ``Embedding``) and the files skipped (``skipped``); on SDXL
        one set per text encoder (``ldm.adapters.sdxl_embeddings``)."""
        from ldm.adapters.embeddings import Embeddings
        from ldm.adapters.sdxl_embeddings import SdxlEmbeddings

        if self._embeddings is None and sdxl.is_sdxl(self):
            self._embeddings = SdxlEmbeddings(sdxl.named_encoders(self))
        if self._embeddings is None:
            self._embeddings = Embeddings(self.text_encoders[0], self.tokenizer or self.tokenizer_2)
        return self._embeddings

    def prompt_words(self) -> tuple[PromptWord, ...]:
        """The words a prompt may write for the loaded embeddings (none before ``load_embeddings``)."""
        return self._embeddings.words() if self._embeddings is not None else ()

    def load_vae(self, path: str | Path) -> None:
        """Replace the VAE with a VAE file or folder: a KL-VAE (original single file or diffusers folder) or
        TAESD (diffusers ``AutoencoderTiny`` folder or its ``taesd_encoder`` / ``taesd_decoder`` files), see
        ``ldm.loading.vae_files``. Loaded in the pipeline's dtype where its networks wait, with its
        attention set up; named in image metadata. One whose latent width differs from the U-Net's is refused.
        """
        from ldm.loading import load_vae

        setup = self.setup
        vae = load_vae(
            path, device="cpu" if setup.cpu_offload else setup.device, dtype=setup.dtype,
            latent_channels=self.unet.config.out_channels, family="sdxl" if sdxl.is_sdxl(self) else "sd1",
        )  # fmt: skip
        vae.set_attention(setup.attention, setup.attention_slice_size)
        set_kernels(vae, self.kernels)
        self.vae = vae.to(memory_format=self.memory_formats.vae)
        self.vae_name = Path(path).name

    # --- ControlNets (ldm.pipeline.control) --------------------------------------------------------

    def load_controlnet(self, path: str | Path, name: str | None = None) -> str:
        """Read a ControlNet (a .safetensors/.pth file or a diffusers folder) for this model's U-Net and keep it; returns
        the name (``name``, else the file's stem made unique) a ``ControlUnit(model=name, ...)`` uses. A unit may
        also name a path, read on first use."""
        return self.controlnets.load(self, path, name)

    def unload_controlnet(self, name: str) -> None:
        """Forget a ControlNet loaded by name; its memory goes with the last call that used it."""
        if name not in self.controlnets.named:
            raise InputError(f"no ControlNet is loaded as {name!r}; loaded: {', '.join(self.controlnets.named) or 'none'}")
        del self.controlnets.named[name]

    # --- SDXL refiners (ldm.pipeline.refiner) -------------------------------------------------------------

    def load_refiner(self, refiner: str | Path | Pipeline, name: str | None = None) -> str:
        """Keep an SDXL refiner (a loaded ``Pipeline``, or a model file or folder, loaded in this pipeline's set-up) for
        calls that name it (``refiner=name``); returns the name (``name``, else the model's). A call may also name a path."""
        return self.refiners.load(self, refiner, name)

    def unload_refiner(self, name: str) -> None:
        """Forget a refiner loaded by name or by the path a call named; its memory goes with the last call that used it."""
        self.refiners.drop(name)

    @property
    def text_encoders(self) -> tuple[nn.Module, ...]:
        """The text encoders the model has: SD's one, SDXL base's two, the refiner's bigG."""
        return tuple(encoder for encoder in (self.text_encoder, self.text_encoder_2) if encoder is not None)

    @property
    def device(self) -> torch.device:
        return self.setup.device

    @property
    def dtype(self) -> torch.dtype:
        return self.setup.dtype

    @property
    def residency(self) -> Residency:
        return self.setup.residency

    @property
    def memory_formats(self) -> MemoryFormats:
        """The U-Net's and the VAE's memory formats: ``setup.channels_last``, or where None the measured choices."""
        return self.setup.memory_formats(self.kernels)

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's short hash of a single-file model (the first 10 hex digits of its sha256); None for a folder."""
        from ldm.loading.hashes import short_hash

        return short_hash(self.source) if self.source is not None and self.source.is_file() else None

    # --- generation --------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = DEFAULTS["num_images_per_prompt"],
        scheduler: str | Scheduler | Any | None = None,
        eta: float | None = None,
        timestep_spacing: TimestepSpacing | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        generator: Generators | None = None,
        seed: int | None = None,
        subseed: int | None = None,
        subseed_strength: float = DEFAULTS["subseed_strength"],
        latents: torch.Tensor | None = None,
        init_image: Image.Image | str | Path | torch.Tensor | None = None,
        strength: float | None = None,
        guidance_rescale: float = DEFAULTS["guidance_rescale"],
        clip_skip: int | None = None,
        output_type: OutputType = "pil",
        callback: StepCallback | None = None,
        guidance_fraction: float = DEFAULTS["guidance_fraction"],
        deepcache_interval: int = DEFAULTS["deepcache_interval"],
        token_merging: float = DEFAULTS["token_merging"],
        control: ControlUnit | list[ControlUnit] | None = None,
        hires_scale: float | None = None, hires_steps: int = 0, hires_strength: float | None = None, hires_upscaler: str | None = None,
        mask: Inpaint | Image.Image | str | Path | None = None,
        prompt_2: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None, sdxl: SdxlOptions | None = None,
        refiner: str | Path | Pipeline | None = None, refiner_switch: float | None = None,
    ) -> GenerationOutput:
        """Generate images with diffusers' keywords (``scheduler``: a name, or a scheduler object as template;
        ``callback(i, t, latents, denoised)`` after each step) and A1111's: ``subseed``/``subseed_strength``
        (variation seeds), ``control`` (ControlNet units), ``mask`` (inpainting: a mask, or an ``Inpaint`` with
        its options or an outpainting), ``hires_*`` (hires fix), SDXL's ``prompt_2``, ``sdxl`` (``SdxlOptions``) and ``refiner``
        (a path, a loaded name or a ``Pipeline``). Each: ``GenerationSettings``, docs/generating.md.
        """
        named = scheduler is None or isinstance(scheduler, str)
        settings = GenerationSettings(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, guidance_fraction=guidance_fraction,
            width=width, height=height, num_images_per_prompt=num_images_per_prompt, scheduler=scheduler if named else DEFAULT_SCHEDULER,
            eta=eta, timestep_spacing=timestep_spacing, seed=seed, timesteps=timesteps, sigmas=sigmas, subseed=subseed,
            subseed_strength=subseed_strength, sigma_schedule=GenerationSettings.sigma_schedule_of(use_karras_sigmas, use_exponential_sigmas),
            init_image=init_image, strength=strength, clip_skip=clip_skip, inpaint=as_inpaint(mask),
            deepcache_interval=deepcache_interval, token_merging=token_merging, control=control,
            hires_scale=hires_scale, hires_steps=hires_steps, hires_strength=hires_strength, hires_upscaler=hires_upscaler,
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, sdxl=sdxl, refiner_switch=refiner_switch,
            refiner=self.load_refiner(refiner) if isinstance(refiner, Pipeline) else refiner,
        )
        return self.generate(
            settings, scheduler=None if named else scheduler, generator=generator, latents=latents,
            callback=callback, output_type=output_type,
        )

    @torch.inference_mode()
    def generate(
        self,
        settings: GenerationSettings,
        *,
        scheduler: Scheduler | Any | None = None,
        generator: Generators | None = None,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        output_type: OutputType = "pil",
    ) -> GenerationOutput:
        """Run the stages of one call (``ldm.pipeline.stages``); ``scheduler`` is a scheduler object used as template."""
        stages.check_output_type(output_type)
        check_loaded(*self.text_encoders, self.unet, self.vae)
        call = stages.resolve(self, settings, scheduler, generator, latents)
        hires.check(self, call)
        with self._prompt_loras_held(call):
            text = stages.encode_prompts(self, call, last_use=not hires.encodes_again(self, call))
            timesteps = stages.prepare_timesteps(self, call)
            x = stages.initial_latents(self, call, timesteps)
            x = stages.denoise(self, call, x, timesteps, text, callback)
            x = hires.second_pass(self, call, x, text, callback)
            x = refining.refined(self, call, x, callback)
            return GenerationOutput(stages.decode_output(self, x, output_type, call.inpaint), call.resolved)

    @contextmanager
    def _prompt_loras_held(self, call: stages.Call) -> Iterator[None]:
        """The call's ``<lora:...>`` LoRAs in the weights while it runs (``stages.apply_loras``). A call that
        overlaps it (from a callback, or another thread) must name the same ones: the weights are shared."""
        wanted = tuple((lora.adapter_name, lora.tag.text_encoder, lora.tag.unet) for lora in call.loras)
        with self._tag_lock:
            if self._tag_calls and wanted != self._tag_key:
                raise InputError(
                    "another call on this pipeline (from a callback or another thread) is running with other <lora:...> "
                    "tags, which are in the shared weights until it ends; wait for it, or use another Pipeline"
                )
            if not self._tag_calls:
                stages.apply_loras(self, call)
                self._tag_key = wanted
            self._tag_calls += 1
        try:
            yield
        finally:
            with self._tag_lock:
                self._tag_calls -= 1

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], decoded as set up (``decode_mode``); raises on NaN / inf."""
        check_loaded(self.vae)
        return stages.decode(self, latents)


def _file_version(path: Path) -> tuple[Path, int]:
    """A file and its modification time: a tag-loaded LoRA whose file changed is read again (as A1111 does)."""
    return path.resolve(), path.stat().st_mtime_ns


def _warn_if_slow(setup: PipelineSetup) -> None:
    """bf16 on a CPU without native bf16 is slower than fp32: say so, with the slowdown measured here."""
    message = bf16_warning(setup.device, setup.dtype)
    if message is not None:
        warnings.warn(message, stacklevel=3)
