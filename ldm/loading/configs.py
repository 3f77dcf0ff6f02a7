"""A model's configuration apart from its weights, and where it is kept.

A diffusers folder keeps it in JSON files (``unet/config.json``, ``vae/config.json``,
``text_encoder/config.json``, SDXL's ``text_encoder_2/config.json``,
``scheduler/scheduler_config.json`` and ldm's ``generation_config.json``). An original single file keeps none: its networks are read from
tensor shapes and SD's conventions (``ldm.loading.detect``), which cannot tell a model with 4
GroupNorm groups, 2 text-encoder heads or another VAE scaling factor from SD. So that every
model ldm writes comes back as it was, a ``.safetensors`` file whose configuration the
conventions would not give back carries it in its metadata, one JSON string per file of the
folder layout (``METADATA_KEYS``); a ``.ckpt`` holds the same strings in a ``"metadata"``
dict beside its ``"state_dict"``. Files that carry none can be given a folder's configuration
(``config=``, as diffusers' ``from_single_file(config=...)``).

Every value is bounded before a network is built (``UNetConfig`` and ``VAEConfig`` bound
their own), and a U-Net that takes neither the VAE's latents alone nor an inpainting model's
latents, mask and masked-image latents is refused (``check_text_to_image``): ldm cannot run
instruct-pix2pix models yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPTextConfig

from ldm.errors import CheckpointError, ConfigError, InputError
from ldm.models import UNetConfig, VAEConfig
from ldm.models._config import check_range
from ldm.models.text_encoder import ENCODERS, clip_config, clip_config_2
from ldm.schedulers import SchedulerConfig
from ldm.settings import GenerationDefaults

Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]
T = TypeVar("T")

# Metadata key of each configuration in a single file.
METADATA_KEYS = {
    "unet": "ldm.unet_config",
    "vae": "ldm.vae_config",
    "text_encoder": "ldm.text_encoder_config",
    "text_encoder_2": "ldm.text_encoder_2_config",
    "scheduler": "ldm.scheduler_config",
    "generation": "ldm.generation_config",
}
NETWORKS = ("unet", "vae", "text_encoder")


def networks_of(family: str) -> tuple[str, ...]:
    """The networks a model of ``family`` has, by their folder names: SDXL adds ``text_encoder_2``, and its
    refiner has no ``text_encoder``."""
    first, second = ENCODERS[family]
    return ("unet", "vae") + ("text_encoder",) * (first is not None) + ("text_encoder_2",) * (second is not None)

# The CLIPTextConfig fields that decide the text encoder's hidden states, which are all SD uses
# (the token ids only move the pooled output; the rest are training settings or bookkeeping).
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
    "max_position_embeddings", "hidden_act", "layer_norm_eps",
)  # fmt: skip
# SDXL's second text encoder also gives its pooled output, whose width the projection decides.
TEXT_2_FIELDS = (*TEXT_FIELDS, "projection_dim")
# The range ldm accepts for each size.
TEXT_BOUNDS = {
    "vocab_size": (1, 1_000_000),
    "hidden_size": (1, 8192),
    "intermediate_size": (1, 65536),
    "num_attention_heads": (1, 128),
    "num_hidden_layers": (1, 64),
    "max_position_embeddings": (1, 4096),
    "projection_dim": (1, 8192),
}

# Models whose U-Net takes more than the latents, by its input width, that ldm cannot run: (one, several).
# An inpainting model's 9 (latents, mask, masked image's latents) it runs (ldm.pipeline.inpaint).
_CONDITIONED_KINDS = {
    8: ("an instruct-pix2pix model", "instruct-pix2pix models"),  # latents, input image's latents
}


@dataclass(frozen=True)
class ModelConfigs:
    """The configuration of the three networks, and what else the model recommends."""

    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig | None  # None: the model has no text_encoder (SDXL refiner)
    scheduler: SchedulerConfig | None = None  # None: the model does not say (the file's conventions decide)
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json; empty: none
    text_2: CLIPTextConfig | None = None  # SDXL's text_encoder_2 (OpenCLIP bigG, with projection); None: none

    @property
    def family(self) -> Family:
        """SD 1.x / 2.x by the text encoder's activation; SDXL base or refiner by which encoders there are."""
        if self.text_2 is not None:
            return "sdxl" if self.text is not None else "sdxl-refiner"
        if self.text is None:
            raise ConfigError("the model has no text encoder (text_encoder/ or text_encoder_2/)")
        return family_of(self.text)


def as_released(configs: ModelConfigs) -> ModelConfigs:
    """``configs`` with the VAE's ``force_upcast`` as diffusers' pipelines of the family read it: SDXL's honour
    it; SD 1.x / 2.x's never read it (diffusers writes its default, true, into every AutoencoderKL config,
    SD 1.5 fine-tunes' included), so an SD model's VAE does not upcast in ldm either."""
    if configs.family in ("sdxl", "sdxl-refiner") or not configs.vae.force_upcast:
        return configs
    return replace(configs, vae=replace(configs.vae, force_upcast=False))


def family_of(text: CLIPTextConfig) -> Family:
    """SD 1.x or 2.x, from the (only) text encoder: OpenCLIP's ``gelu`` is SD 2.x, OpenAI CLIP's ``quick_gelu`` SD 1.x."""
    if text.hidden_act == "gelu":
        return "sd2"
    if text.hidden_act == "quick_gelu":
        return "sd1"
    raise ConfigError(f"text encoder activation {text.hidden_act!r} is neither SD 1.x (quick_gelu) nor SD 2.x (gelu)")


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a diffusers model folder needs unet/, vae/, text_encoder/ configs")
    return parse_json(path.read_text(), str(path))


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{where} is not valid JSON ({error.msg} at line {error.lineno})") from None


def built(make: Callable[[dict], T], values: Any, where: str) -> T:
    """``make(values)`` for a JSON object; anything else, or a value of the wrong type, is a ConfigError
    naming ``where`` (a file's metadata is untrusted input like any other)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must hold a JSON object, not {type(values).__name__}")
    try:
        return make(values)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as error:
        raise ConfigError(f"{where}: {error}".splitlines()[0]) from None


def text_config(values: Any, where: str, base: Mapping[str, Any] | None = None) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` from a ``text_encoder/config.json`` dict (on top of ``base``), every size bounded."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must hold a JSON object")
    for key, (low, high) in TEXT_BOUNDS.items():
        if key in values:
            check_range("text encoder", key, values[key], low, high)
    config = built(CLIPTextConfig.from_dict, {**(base or {}), **values}, where)
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"text encoder config key 'num_attention_heads'={config.num_attention_heads} must divide "
            f"hidden_size {config.hidden_size}"
        )
    return config


def text_fields(config: CLIPTextConfig | None, fields: tuple[str, ...] = TEXT_FIELDS) -> dict[str, Any] | None:
    """The ``fields`` (``TEXT_FIELDS``, ``TEXT_2_FIELDS``): what two text encoders must share to be the same network."""
    return None if config is None else {key: getattr(config, key) for key in fields}


def generation_config(values: Any, where: str) -> dict[str, Any]:
    """``values`` if ``GenerationDefaults`` accepts them (a ConfigError naming ``where`` if not)."""
    try:
        if not isinstance(values, dict):
            raise TypeError("not a JSON object")
        GenerationDefaults(**values)
    except (TypeError, ValueError, InputError) as error:
        allowed = ", ".join(GenerationDefaults.__dataclass_fields__)
        raise ConfigError(f"{where}: {error}; it holds a JSON object with some of: {allowed}") from None
    return dict(values)


def folder_configs(folder: Path) -> ModelConfigs:
    """The configuration files of a diffusers folder (weights are not needed).

    ``text_encoder/`` is needed unless the folder has ``text_encoder_2/`` (an SDXL refiner has only that).
    """
    unet_path, vae_path = folder / "unet" / "config.json", folder / "vae" / "config.json"
    unet = built(UNetConfig.from_diffusers, read_json(unet_path), str(unet_path))
    vae = built(VAEConfig.from_diffusers, read_json(vae_path), str(vae_path))
    text_path, text_2_path = folder / "text_encoder" / "config.json", folder / "text_encoder_2" / "config.json"
    has_text = text_path.is_file() or not text_2_path.is_file()  # without either: text_encoder/ is what is missing
    text = text_config(read_json(text_path), str(text_path)) if has_text else None
    text_2 = text_config(read_json(text_2_path), str(text_2_path)) if text_2_path.is_file() else None
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_values = read_json(scheduler_path) if scheduler_path.is_file() else None
    scheduler = built(SchedulerConfig.from_diffusers, scheduler_values, str(scheduler_path)) if scheduler_values is not None else None
    generation_path = folder / "generation_config.json"
    if generation_path.is_file():
        generation = generation_config(read_json(generation_path), str(generation_path))
    else:
        generation = few_step_recommendation(unet, scheduler_values)
    return as_released(ModelConfigs(unet, vae, text, scheduler, generation, text_2))


def few_step_recommendation(unet: UNetConfig, scheduler_values: Any) -> dict[str, Any]:
    """What a folder without ``generation_config.json`` recommends when it was made for LCM's few steps:
    diffusers' ``LatentConsistencyModelPipeline`` samples such a folder with its own ``LCMScheduler`` and 4
    steps, at guidance 8.5 for a U-Net that embeds the scale; a plain U-Net saved with an LCM scheduler
    (an LCM-LoRA fused in) runs unguided, as diffusers' LCM-LoRA guide advises (a scale of 1 to 2, or none)."""
    lcm = isinstance(scheduler_values, dict) and scheduler_values.get("_class_name") == "LCMScheduler"
    if unet.time_cond_proj_dim is not None:
        return {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 8.5}
    return {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0} if lcm else {}


def to_metadata(configs: ModelConfigs, parts: tuple[str, ...]) -> dict[str, str]:
    """The metadata strings of ``parts`` (names of ``METADATA_KEYS``); sorted JSON, so the bytes are fixed."""
    values = {
        "unet": configs.unet.to_diffusers(),
        "vae": configs.vae.to_diffusers(),
        "text_encoder": text_fields(configs.text),
        "text_encoder_2": text_fields(configs.text_2, TEXT_2_FIELDS),
        "scheduler": configs.scheduler.to_diffusers() if configs.scheduler is not None else None,
        "generation": configs.generation,
    }
    return {METADATA_KEYS[part]: json.dumps(values[part], sort_keys=True) for part in parts}


def from_metadata(metadata: Mapping[str, str], path: Path, family: Family) -> ModelConfigs | None:
    """The configuration a single file carries, or None when it carries no network configs.

    The text encoders' fields not in ``TEXT_FIELDS`` / ``TEXT_2_FIELDS`` are the ``family``'s.
    """
    networks = networks_of(family)
    present = [part for part in networks if METADATA_KEYS[part] in metadata]
    if not present:
        return None
    if len(present) < len(networks):
        missing = ", ".join(METADATA_KEYS[p] for p in networks if p not in present)
        raise CheckpointError(f"{path} carries only part of its configuration (no {missing}); pass config= a model folder")
    scheduler, generation = recommendations_from_metadata(metadata, path)

    def text(part: str, base: Callable[[Family], CLIPTextConfig]) -> CLIPTextConfig | None:
        if part not in networks:
            return None
        return text_config(_metadata_value(metadata, part, path), _where(part, path), base(family).to_dict())

    return as_released(ModelConfigs(
        unet=built(UNetConfig.from_diffusers, _metadata_value(metadata, "unet", path), _where("unet", path)),
        vae=built(VAEConfig.from_diffusers, _metadata_value(metadata, "vae", path), _where("vae", path)),
        text=text("text_encoder", clip_config),
        scheduler=scheduler,
        generation=generation,
        text_2=text("text_encoder_2", clip_config_2),
    ))


def recommendations_from_metadata(metadata: Mapping[str, str], path: Path) -> tuple[SchedulerConfig | None, dict[str, Any]]:
    """The scheduler config and generation defaults a single file carries (None and {} where it carries none).

    A file of SD's shapes carries them without network configs, so they are read on their own.
    """
    scheduler, generation = None, {}
    if METADATA_KEYS["scheduler"] in metadata:
        scheduler = built(SchedulerConfig.from_diffusers, _metadata_value(metadata, "scheduler", path), _where("scheduler", path))
    if METADATA_KEYS["generation"] in metadata:
        generation = generation_config(_metadata_value(metadata, "generation", path), _where("generation", path))
    return scheduler, generation


def _where(part: str, path: Path) -> str:
    return f"the {METADATA_KEYS[part]} metadata of {path}"


def _metadata_value(metadata: Mapping[str, str], part: str, path: Path) -> Any:
    return parse_json(metadata[METADATA_KEYS[part]], _where(part, path))


def check_text_to_image(unet: UNetConfig, vae: VAEConfig, source: Path) -> None:
    """Refuse a U-Net that does not map the VAE's latents (alone, or with an inpainting model's mask and masked-image
    latents: 2 * latents + 1 channels) to a prediction of their shape."""
    latents = vae.latent_channels
    if unet.in_channels == 2 * latents + 1 and unet.out_channels == latents:
        return
    if unet.in_channels in _CONDITIONED_KINDS and unet.in_channels != latents:
        one, several = _CONDITIONED_KINDS[unet.in_channels]
        raise CheckpointError(
            f"{source} is {one} (U-Net takes {unet.in_channels} input channels, the VAE makes {latents}); "
            f"ldm cannot run {several} yet"
        )
    for what, channels in (("takes", unet.in_channels), ("predicts", unet.out_channels)):
        if channels != latents:
            raise CheckpointError(
                f"{source} has a U-Net that {what} {channels} channels but a VAE with {latents} latent channels; "
                "ldm runs only text-to-image models whose U-Net works on the latents alone"
            )



def native_side(unet: UNetConfig, vae: VAEConfig) -> int:
    """The side of the images a model was trained at: its latent size times the VAE's downsampling."""
    return unet.sample_size * vae.downsample_factor


def native_side_estimate(model: Path, config: Path | None = None) -> int | None:
    """The side of the model's native image size, read without loading any weight; None if unknown.

    A folder (or a ``config`` folder) says it; a ``.safetensors`` file that carries its
    configuration says it in its header. Any other file's size comes from detection, which needs
    its tensors (and reading a ``.ckpt``'s metadata means reading the whole file).
    """
    if config is not None or (model / "unet" / "config.json").is_file():
        configs = folder_configs(config if config is not None else model)
        return native_side(configs.unet, configs.vae)
    if model.suffix == ".safetensors":
        from ldm.loading.sources import TensorFile

        metadata = TensorFile(model).metadata
        if METADATA_KEYS["unet"] in metadata and METADATA_KEYS["vae"] in metadata:
            unet = built(UNetConfig.from_diffusers, _metadata_value(metadata, "unet", model), _where("unet", model))
            vae = built(VAEConfig.from_diffusers, _metadata_value(metadata, "vae", model), _where("vae", model))
            return native_side(unet, vae)
    return None
