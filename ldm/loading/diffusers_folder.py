"""The diffusers folder layout: ``model_index.json`` and one sub-folder per component.

::

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model.safetensors
    vae/config.json           vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json  text_encoder/model.safetensors
    tokenizer/                (vocab.json, merges.txt, ...)
    scheduler/scheduler_config.json
    generation_config.json    (optional, ldm's: the guidance and steps the model recommends)

Weights may also be ``.bin`` pickles, sharded (``*.index.json``) or only the fp16
variant (``diffusion_pytorch_model.fp16.safetensors``); full precision is preferred
when several exist. ldm's networks use diffusers' key names, so no renaming happens
here; the text encoder's keys may carry the ``text_model.`` prefix of the released
folders (transformers < 5) or not. Weights are written byte for byte reproducibly
(``ldm.loading.writers``).

The family is read from the text encoder: OpenCLIP's ``gelu`` is SD 2.x, OpenAI
CLIP's ``quick_gelu`` is SD 1.x.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm.errors import CheckpointError, ConfigError
from ldm.io import atomic_write_dir
from ldm.loading import keymap
from ldm.loading.components import Components, build_networks, finish, load_entries, resolve_tokenizer, shapes_of
from ldm.loading.configs import built, check_text_to_image, folder_configs, read_json
from ldm.loading.detect import PredictionType
from ldm.loading.keymap import Entry
from ldm.loading.sources import open_component
from ldm.loading.writers import write_safetensors
from ldm.models import TAESD, AutoencoderKL, TAESDConfig, VAEConfig
from ldm.schedulers import SchedulerConfig


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def family_of(text: CLIPTextConfig) -> str:
    if text.hidden_act == "gelu":
        return "sd2"
    if text.hidden_act == "quick_gelu":
        return "sd1"
    raise ConfigError(f"text encoder activation {text.hidden_act!r} is neither SD 1.x (quick_gelu) nor SD 2.x (gelu)")


def _load_part(model, folder: Path, library: str, *, device, dtype) -> None:
    source = open_component(folder, library)
    text = library == "transformers"
    names = {keymap.normalize_text_encoder_key(key) if text else key: key for key in source.shapes}
    file_shapes = {name: source.shapes[key] for name, key in names.items()}
    entries = [Entry(key, (key,), "copy", shape) for key, shape in shapes_of(model).items()]
    # Older transformers saved the recomputed position_ids buffer.
    optional = {keymap.TEXT_POSITION_IDS: None} if text else {}
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
    family = family_of(configs.text)
    unet, vae, text_encoder = build_networks(configs.unet, configs.vae, configs.text)
    _load_part(unet, folder / "unet", "diffusers", device=device, dtype=dtype)
    _load_part(vae, folder / "vae", "diffusers", device=device, dtype=dtype)
    _load_part(text_encoder, folder / "text_encoder", "transformers", device=device, dtype=dtype)
    finish(unet, vae, text_encoder, device)

    # A folder without a scheduler config says as little as a single file: SD's released keys.
    scheduler = configs.scheduler or SchedulerConfig.sd_release()
    if prediction_type is not None:
        scheduler = scheduler.with_values(prediction_type=prediction_type)
    loaded_tokenizer = resolve_tokenizer(tokenizer, family, folder / "tokenizer")
    return Components(
        unet, vae, text_encoder, loaded_tokenizer, scheduler, family, folder, configs.generation, model_name(folder)
    )


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


def _model_index(name: str | None) -> dict:
    return {
        **({NAME_KEY: name} if name else {}),
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
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
        _write_json(tmp / "model_index.json", _model_index(name))
        for part, model, config in (
            ("unet", components.unet, components.unet.config.to_diffusers()),
            ("vae", components.vae, components.vae.config.to_diffusers()),
        ):
            (tmp / part).mkdir()
            _write_json(tmp / part / "config.json", config)
            write_safetensors(tmp / part / "diffusion_pytorch_model.safetensors", _tensors(model, dtype), {"format": "pt"})
        (tmp / "text_encoder").mkdir()
        text_config = components.text_encoder.config.to_dict()
        text_config["architectures"] = ["CLIPTextModel"]
        _write_json(tmp / "text_encoder" / "config.json", text_config)
        # The "text_model." prefix of the released folders: read by transformers 4 and 5 alike.
        weights = _tensors(components.text_encoder, dtype, keymap.TEXT_MODEL_PREFIX)
        write_safetensors(tmp / "text_encoder" / "model.safetensors", weights, {"format": "pt"})
        components.tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", components.scheduler_config.to_diffusers())
        if components.generation_config:
            _write_json(tmp / "generation_config.json", components.generation_config)

    try:
        return atomic_write_dir(folder, write)
    except FileExistsError:
        raise CheckpointError(f"{folder} already exists; ldm never overwrites, choose a new folder name") from None
