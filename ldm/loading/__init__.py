"""Loading and saving Stable Diffusion 1.x / 2.x and SDXL (base and refiner) models, offline.

Two layouts are read and written:

- a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; SDXL's ``text_encoder_2/``, ``tokenizer_2/``), see
  ``ldm.loading.diffusers_folder``;
- an original single file (``.safetensors`` or ``.ckpt``), see ``ldm.loading.single_file``;
  its architecture and family are detected from keys and shapes (``ldm.loading.detect``),
  every rename lives in ``ldm.loading.keymap``; ldm's own files carry the configuration the
  conventions would not give back (``ldm.loading.configs``).

What is written, is written byte for byte reproducibly (``ldm.loading.writers``). Models ldm
cannot run (instruct-pix2pix) and configurations no machine could build are refused before any
network is built; inpainting models (a U-Net of 9 input channels) load and run.

Nothing here touches the network: paths are local, tokenizers come from the model
folder, the shipped ``ldm/assets/clip_tokenizer`` or a ``tokenizer=`` path.

VAE files and folders that replace a model's VAE (a KL-VAE or TAESD) are read by ``load_vae``
(``ldm.loading.vae_files``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTokenizer

from ldm.errors import CheckpointError, ConfigError
from ldm.loading.components import Components, parse_dtype
from ldm.loading.configs import folder_configs
from ldm.loading.detect import Family, PredictionType, detect_family
from ldm.loading.diffusers_folder import is_diffusers_folder, load_diffusers, load_model_vae, save_diffusers
from ldm.loading.single_file import load_single_file, save_single_file
from ldm.loading.vae_files import find_vae, load_vae

__all__ = [
    "DEFAULT_MODEL_DIR",
    "Components",
    "check_config_folder",
    "find_vae",
    "load_components",
    "load_vae",
    "load_vae_only",
    "model_family",
    "save_diffusers",
    "save_single_file",
]



def _default_model_dir() -> Path:
    """The project's own model, in the diffusers layout: inside the package in an installed wheel
    (``setup.py`` copies it there), at the top of the repository in a checkout or editable install."""
    package = Path(__file__).resolve().parents[1]
    installed, checkout = package / "weights" / "ldm-shapes", package.parent / "weights" / "ldm-shapes"
    return checkout if checkout.is_dir() and not installed.is_dir() else installed


DEFAULT_MODEL_DIR = _default_model_dir()

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def load_vae_only(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32):
    """Only the ``AutoencoderKL`` of a diffusers folder, for decode-only work (as diffusers'
    ``AutoencoderKL.from_pretrained(folder, subfolder="vae")``)."""
    path = Path(path)
    if not is_diffusers_folder(path):
        raise CheckpointError(f"{path} is not a diffusers model folder; load_vae_only reads a folder's vae/ (use load_components for files)")
    return load_model_vae(path, device=torch.device(device), dtype=parse_dtype(dtype))


def load_components(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    prediction_type: PredictionType | None = None,
    tokenizer: str | Path | CLIPTokenizer | None = None,
    config: str | Path | None = None,
) -> Components:
    """Load a diffusers folder or a single ``.safetensors``/``.ckpt`` file.

    ``prediction_type`` overrides the file's (or the detected) one; ``tokenizer`` is a
    tokenizer folder, ``"sd1"``/``"sd2"``/``"sdxl"`` for the shipped one, or a ``CLIPTokenizer``
    (the first tokenizer; SDXL's ``tokenizer_2`` comes from the model folder or is the shipped
    one padding with "!"). SDXL models come with ``text_encoder_2`` and ``tokenizer_2``.
    ``config`` is a diffusers folder whose configuration files (weights not needed) describe a
    single file, instead of what the file carries or SD's conventions (diffusers'
    ``from_single_file(config=...)``); its ``tokenizer/`` is used when it has one.
    """
    path = Path(path)
    config = check_config_folder(Path(config)) if config is not None else None
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    if prediction_type is not None and prediction_type not in _PREDICTION_TYPES:
        raise CheckpointError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(_PREDICTION_TYPES)}")
    options = dict(device=device, dtype=dtype, prediction_type=prediction_type, tokenizer=tokenizer)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a .safetensors/.ckpt file or a diffusers model folder")
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(_not_a_model_folder(path))
        if config is not None:
            raise ConfigError(f"{path} is a diffusers folder, which carries its own configuration; drop config=")
        return load_diffusers(path, **options)
    return load_single_file(path, config=config, **options)


def model_family(path: str | Path, config: str | Path | None = None) -> Family:
    """The family of a model folder or single file, read from its configuration or keys without its weights."""
    path = Path(path)
    if path.is_dir() or config is not None:
        folder = check_config_folder(Path(config)) if config is not None else path
        if not is_diffusers_folder(folder):
            raise CheckpointError(_not_a_model_folder(folder))
        return folder_configs(folder).family
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a .safetensors/.ckpt file or a diffusers model folder")
    from ldm.loading.keymap import normalize_single_file_key
    from ldm.loading.sources import TensorFile

    return detect_family({normalize_single_file_key(key): shape for key, shape in TensorFile(path).shapes.items()})


def _not_a_model_folder(path: Path) -> str:
    """Why ``path``, a folder that is no diffusers model, cannot be loaded as one."""
    try:
        find_vae(path)
    except CheckpointError:
        return f"{path} is a folder without model_index.json or unet/config.json; not a diffusers model"
    return f"{path} is a VAE, not a whole model; pass a model, and this folder as its VAE (--vae / vae=)"


def check_config_folder(folder: Path) -> Path:
    """``folder`` if it holds a diffusers model's configuration files, else a one-line error."""
    needed = ("unet/config.json", "vae/config.json")
    encoders = ("text_encoder/config.json", "text_encoder_2/config.json")  # SDXL's refiner has only the second
    if not folder.is_dir() or not all((folder / name).is_file() for name in needed) or not any(
        (folder / name).is_file() for name in encoders
    ):
        raise ConfigError(
            f"{folder} is not a model configuration folder; pass a diffusers model folder (with "
            f"{', '.join(needed)}, {encoders[0]})"
        )
    return folder
