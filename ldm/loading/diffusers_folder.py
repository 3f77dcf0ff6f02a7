"""The diffusers folder layout: ``model_index.json`` and one sub-folder per component.

::

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model.safetensors
    vae/config.json           vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json  text_encoder/model.safetensors
    tokenizer/                (vocab.json, merges.txt, ...)
    scheduler/scheduler_config.json
    generation_config.json    (optional, ldm's: the guidance and steps the model recommends)

SDXL adds ``text_encoder_2/`` (``CLIPTextModelWithProjection``: OpenCLIP bigG) and ``tokenizer_2/``
(``StableDiffusionXLPipeline``); its refiner has those alone, with ``text_encoder`` and ``tokenizer``
null in ``model_index.json`` (``StableDiffusionXLImg2ImgPipeline``).

Weights may also be ``.bin`` pickles, sharded (``*.index.json``) or only the fp16
variant (``diffusion_pytorch_model.fp16.safetensors``); full precision is preferred
when several exist. ldm's networks use diffusers' key names, so no renaming happens
here; the text encoder's keys may carry the ``text_model.`` prefix of the released
folders (transformers < 5) or not. Weights are written byte for byte reproducibly
(``ldm.loading.writers``).

The family is read from the text encoders: OpenCLIP's ``gelu`` is SD 2.x, OpenAI
CLIP's ``quick_gelu`` is SD 1.x; a ``text_encoder_2/`` is SDXL (the refiner without
``text_encoder/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from ldm.errors import CheckpointError
from ldm.io import atomic_write_dir
from ldm.loading import keymap
from ldm.loading.components import (
    Components,
    build_networks,
    build_text_encoder_2,
    finish,
    load_entries,
    resolve_tokenizer,
    resolve_tokenizer_2,
    shapes_of,
)
from ldm.loading.configs import built, check_text_to_image, folder_configs, read_json
from ldm.loading.detect import SDXL_FAMILIES, PredictionType
from ldm.loading.keymap import Entry
from ldm.loading.sources import open_component
from ldm.loading.writers import write_safetensors
from ldm.models import TAESD, AutoencoderKL, TAESDConfig, VAEConfig
from ldm.schedulers import SchedulerConfig


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def _load_part(model, folder: Path, library: str, *, device, dtype) -> None:
    source = open_component(folder, library)
    model_shapes = shapes_of(model)
    text = library == "transformers"
    # transformers 5's CLIPTextModel names its keys without the "text_model." of the released folders;
    # CLIPTextModelWithProjection (SDXL's text_encoder_2) keeps it.
    bare = text and not any(key.startswith(keymap.TEXT_MODEL_PREFIX) for key in model_shapes)
    names = {keymap.normalize_text_encoder_key(key) if bare else key: key for key in source.shapes}
    file_shapes = {name: source.shapes[key] for name, key in names.items()}
    entries = [Entry(key, (key,), "copy", shape) for key, shape in model_shapes.items()]
    # Older transformers saved the recomputed position_ids buffer.
    position_ids = keymap.TEXT_POSITION_IDS if bare else keymap.TEXT_MODEL_PREFIX + keymap.TEXT_POSITION_IDS
    optional = {position_ids: None} if text else {}
    load_entries(
        model,
        entries,
        file_shapes,
        lambda name: source.read(names[name]),
        device=device,
        dtype=dtype,
        where=str(folder),
        optional=optional,
    )


def load_diffusers(
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    prediction_type: PredictionType | None,
    tokenizer: str | Path | CLIPTokenizer | None,
) -> Components:
    configs = folder_configs(folder)
    check_text_to_image(configs.unet, configs.vae, folder)
    family = configs.family
    unet, vae, text_encoder = build_networks(configs.unet, configs.vae, configs.text)
    text_encoder_2 = build_text_encoder_2(configs.text_2)
    parts = (("unet", unet, "diffusers"), ("vae", vae, "diffusers"),
             ("text_encoder", text_encoder, "transformers"), ("text_encoder_2", text_encoder_2, "transformers"))  # fmt: skip
    for part, model, library in parts:
        if model is not None:
            _load_part(model, folder / part, library, device=device, dtype=dtype)
    finish(unet, vae, text_encoder, device, text_encoder_2)

    # A folder without a scheduler config says as little as a single file: SD's released keys.
    scheduler = configs.scheduler or SchedulerConfig.sd_release()
    if prediction_type is not None:
        scheduler = scheduler.with_values(prediction_type=prediction_type)
    return Components(
        unet, vae, text_encoder, resolve_tokenizer(tokenizer, family, folder / "tokenizer"), scheduler, family, folder,
        configs.generation, model_name(folder), text_encoder_2, resolve_tokenizer_2(family, folder / "tokenizer_2"),
    )  # fmt: skip


# The VAE classes a diffusers VAE folder may name in its config.json, with ours.
VAE_CLASSES = {"AutoencoderKL": (VAEConfig, AutoencoderKL), "AutoencoderTiny": (TAESDConfig, TAESD)}


def vae_folder_config(folder: Path) -> VAEConfig | TAESDConfig:
    """The configuration of a diffusers VAE folder (``config.json``): a KL-VAE or TAESD, by ``_class_name``."""
    path = folder / "config.json"
    values = read_json(path)
    name = values.get("_class_name", "AutoencoderKL") if isinstance(values, dict) else None
    if name not in VAE_CLASSES:
        raise CheckpointError(f"{path} describes a {name}, not a VAE; ldm reads AutoencoderKL and AutoencoderTiny (TAESD) folders")
    return built(VAE_CLASSES[name][0].from_diffusers, values, str(path))


def load_vae_folder(
    folder: Path, config: VAEConfig | TAESDConfig, *, device: torch.device, dtype: torch.dtype
) -> AutoencoderKL | TAESD:
    """The VAE of a diffusers VAE folder (``config`` read by ``vae_folder_config``), strictly loaded."""
    network = {VAEConfig: AutoencoderKL, TAESDConfig: TAESD}[type(config)]
    with torch.device("meta"):
        vae = network(config)
    _load_part(vae, folder, "diffusers", device=device, dtype=dtype)
    for key, tensor in [*vae.named_parameters(), *vae.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"VAE tensor {key} was not loaded")
    return vae.eval()


def load_model_vae(folder: Path, *, device: torch.device, dtype: torch.dtype) -> AutoencoderKL | TAESD:
    """Only the VAE of a diffusers model folder (for decode-only work: nothing else is read)."""
    return load_vae_folder(folder / "vae", vae_folder_config(folder / "vae"), device=device, dtype=dtype)


# A name the model records for itself in model_index.json (diffusers ignores "_" keys); without
# one, a model is named after its folder.
NAME_KEY = "_ldm_name"


def model_name(folder: Path) -> str | None:
    """The name ``folder``'s model records for itself, if any."""
    index = folder / "model_index.json"
    values = read_json(index) if index.is_file() else {}
    name = values.get(NAME_KEY) if isinstance(values, dict) else None
    return name if isinstance(name, str) and name else None


# What model_index.json says of each family's pipeline (diffusers' pipeline class and its options).
_PIPELINES: dict[str, dict] = {
    "sd1": {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False, "safety_checker": [None, None]},
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True, "image_encoder": [None, None]},
    "sdxl-refiner": {
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": False,
        "requires_aesthetics_score": True, "image_encoder": [None, None],
    },
}  # fmt: skip
_PIPELINES["sd2"] = _PIPELINES["sd1"]
# The class of each network and tokenizer, by folder (model_index.json names [library, class]).
_PARTS = {
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _model_index(name: str | None, components: Components) -> dict:
    present = {
        "text_encoder": components.text_encoder is not None,
        "text_encoder_2": components.text_encoder_2 is not None,
        "tokenizer": components.tokenizer is not None,
        "tokenizer_2": components.tokenizer_2 is not None,
    }
    sdxl = components.family in SDXL_FAMILIES
    parts = {part: kind if present.get(part, True) else [None, None] for part, kind in _PARTS.items()}
    if not sdxl:  # SD 1.x / 2.x folders keep the layout they always had
        del parts["text_encoder_2"], parts["tokenizer_2"]
    return {
        **({NAME_KEY: name} if name else {}),
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        **_PIPELINES[components.family],
        **parts,
    }


def _tensors(model, dtype: torch.dtype | None, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[prefix + key] = value.cpu().contiguous()
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _write_text_encoder(folder: Path, encoder, dtype: torch.dtype | None) -> None:
    """A transformers text encoder folder: config.json (its class in ``architectures``) and model.safetensors."""
    folder.mkdir()
    config = encoder.config.to_dict()
    config["architectures"] = [type(encoder).__name__]
    _write_json(folder / "config.json", config)
    # CLIPTextModel's keys get the "text_model." prefix of the released folders (read by transformers 4 and 5
    # alike); CLIPTextModelWithProjection's have it already.
    own = encoder.state_dict()
    prefix = "" if any(key.startswith(keymap.TEXT_MODEL_PREFIX) for key in own) else keymap.TEXT_MODEL_PREFIX
    write_safetensors(folder / "model.safetensors", _tensors(encoder, dtype, prefix), {"format": "pt"})


def save_diffusers(
    components: Components, folder: str | Path, dtype: torch.dtype | None = None, name: str | None = None
) -> Path:
    """Write ``components`` as a diffusers folder (loads in diffusers' ``from_pretrained``), atomically.

    ``name``: what images made with the model call it, when not the folder's name (a fine-tuned
    model in ``OUT/model/`` is named after ``OUT``).
    """
    folder = Path(folder)
    if folder.exists():
        raise CheckpointError(f"{folder} already exists; ldm never overwrites, choose a new folder name")

    def write(tmp: Path) -> None:
        _write_json(tmp / "model_index.json", _model_index(name, components))
        for part, model, config in (
            ("unet", components.unet, components.unet.config.to_diffusers()),
            ("vae", components.vae, components.vae.config.to_diffusers()),
        ):
            (tmp / part).mkdir()
            _write_json(tmp / part / "config.json", config)
            write_safetensors(tmp / part / "diffusion_pytorch_model.safetensors", _tensors(model, dtype), {"format": "pt"})
        for part, encoder, tokenizer in (
            ("text_encoder", components.text_encoder, components.tokenizer),
            ("text_encoder_2", components.text_encoder_2, components.tokenizer_2),
        ):
            if encoder is not None:
                _write_text_encoder(tmp / part, encoder, dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / part.replace("text_encoder", "tokenizer"))
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", components.scheduler_config.to_diffusers())
        if components.generation_config:
            _write_json(tmp / "generation_config.json", components.generation_config)

    try:
        return atomic_write_dir(folder, write)
    except FileExistsError:
        raise CheckpointError(f"{folder} already exists; ldm never overwrites, choose a new folder name") from None
