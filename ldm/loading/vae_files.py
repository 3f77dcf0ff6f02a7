"""VAE files and folders that replace a model's VAE (``--vae``, ``Pipeline.from_pretrained(model, vae=...)``,
``pipe.load_vae``), told apart by what they hold, not by their names:

| given                                   | holds                                                | network         |
|-----------------------------------------|------------------------------------------------------|-----------------|
| a diffusers VAE folder                  | ``config.json`` (``_class_name``) + weights          | ``AutoencoderKL`` or ``TAESD`` |
| one ``.safetensors`` / ``.ckpt`` / ``.pt`` | the original KL layout (``encoder.down.0.block.0...``, ``first_stage_model.`` prefix optional) | ``AutoencoderKL`` |
| ``taesd_encoder.*`` + ``taesd_decoder.*``: either file, or the folder holding both | TAESD's original sequences (``0.weight``, ``1.conv.0.weight``...) | ``TAESD`` |
| ``taesd_decoder.*`` alone, or a folder holding only it | the decoder's sequence | ``TAESD`` that decodes only (no img2img) |

A file's configuration comes from its shapes and SD's conventions (``ldm.loading.detect``: 32
GroupNorm groups and scaling factor 0.18215 for a KL-VAE, 1.0 for TAESD); every rename from
``ldm.loading.keymap``; loading is strict, as for models. ``.ckpt`` files are read with
``torch.load(weights_only=True)``, their weights under ``state_dict`` or at the top; a KL file's
``loss.*`` (training loss) and ``model_ema.*`` tensors are ignored.

Refused in one line each: a whole model given as a VAE, a VAE whose latent width is not the U-Net's,
a folder or file that holds no VAE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from ldm.errors import CheckpointError
from ldm.loading import keymap
from ldm.loading.components import load_entries, parse_dtype, shapes_of
from ldm.loading.configs import built
from ldm.loading.detect import SDXL_FAMILIES, Family, taesd_config, taesd_decoder_config, vae_config
from ldm.loading.diffusers_folder import load_vae_folder, vae_folder_config
from ldm.loading.sources import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, TensorFile
from ldm.models import TAESD, AutoencoderKL, TAESDConfig, VAEConfig

VaeKind = Literal["folder", "kl-file", "taesd-files", "taesd-decoder"]
Check = Callable[[VAEConfig | TAESDConfig], None]  # refuses a configuration before any weight is read
VAE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Keys of an original KL-VAE file that the network does not use (VAE training state).
_IGNORED_PREFIXES = ("loss.", "model_ema.")
_TAESD_PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class VaeSource:
    """A VAE found at a path: its kind and what holds its weights (a folder, a file, or TAESD's two files)."""

    kind: VaeKind
    paths: tuple[Path, ...]


def find_vae(path: str | Path) -> VaeSource:
    """What ``path`` holds, read from configs and keys only (no weights); a one-line error if not a VAE."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE {path} does not exist; pass a VAE .safetensors/.ckpt file, a diffusers VAE folder or TAESD's files")
    if path.is_dir():
        return _find_in_folder(path)
    if path.suffix not in VAE_SUFFIXES:
        raise CheckpointError(f"VAE {path} has an unknown extension; ldm reads {', '.join(VAE_SUFFIXES)} files")
    return _source_of_file(path, keymap.vae_layout(_keys_of(TensorFile(path), path)))


def load_vae(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    latent_channels: int | None = None,
    family: Family = "sd1",
) -> AutoencoderKL | TAESD:
    """Load a KL-VAE or TAESD from a file, a diffusers VAE folder or TAESD's two files (module docstring).

    ``latent_channels``: the U-Net's input width; a VAE of another width is refused before its
    weights are read. ``family``: the model's, which sets what a KL file does not say (SDXL's scaling
    factor 0.13025 and fp32 decodes in fp16, as A1111 takes the model's scale) and whether a folder's
    ``force_upcast`` is read (SDXL's pipelines read it; SD's never do: ``ldm.loading.configs.as_released``).
    """
    source = find_vae(path)
    device, dtype = torch.device(device), parse_dtype(dtype)

    def check(config: VAEConfig | TAESDConfig) -> None:
        check_vae_fits(config.latent_channels, latent_channels, Path(path))

    if source.kind == "kl-file":
        return _load_kl_file(source, check, device, dtype, family)
    vae = _LOADERS[source.kind](source, check, device, dtype)
    if isinstance(vae, AutoencoderKL) and vae.config.force_upcast and family not in SDXL_FAMILIES:
        vae.config = replace(vae.config, force_upcast=False)
    return vae


def check_vae_fits(vae_channels: int, unet_channels: int | None, path: Path) -> None:
    """Refuse a VAE whose latents are not as wide as what the U-Net takes."""
    if unet_channels is not None and vae_channels != unet_channels:
        raise CheckpointError(
            f"VAE {path} makes {vae_channels}-channel latents but the model's U-Net takes {unet_channels}; "
            "use a VAE made for this model's family"
        )


# --- finding ---------------------------------------------------------------------------------------


def _keys_of(file: TensorFile, path: Path) -> set[str]:
    keys = set(file.shapes)
    if keymap.is_whole_model(keys):
        raise CheckpointError(
            f"{path} is a whole model (it has U-Net weights), not a VAE; load it as the model and pass a VAE file as the VAE"
        )
    return keys


def _source_of_file(path: Path, layout: keymap.VaeLayout | None) -> VaeSource:
    if layout == "kl":
        return VaeSource("kl-file", (path,))
    if layout in ("taesd-encoder", "taesd-decoder"):
        return _taesd_source(path, layout)
    if layout == "kl-diffusers":
        raise CheckpointError(f"{path} holds diffusers-named VAE weights; pass the folder that holds it and its config.json")
    raise CheckpointError(f"{path} holds no VAE weights (neither a KL-VAE nor TAESD); pass a VAE file or folder")


def _taesd_source(path: Path, layout: keymap.VaeLayout) -> VaeSource:
    """Both TAESD files: ``path`` and the file beside it named with the other part; a decoder alone (as A1111
    ships ``taesd_decoder.pth`` for previews) decodes but cannot encode (img2img)."""
    own, other = ("encoder", "decoder") if layout == "taesd-encoder" else ("decoder", "encoder")
    if own not in path.stem:
        raise CheckpointError(f"{path} is a TAESD {own} whose name does not say so; name it like taesd_{own}{path.suffix}")
    stem = other.join(path.stem.rsplit(own, 1))
    partners = [path.with_name(stem + suffix) for suffix in VAE_SUFFIXES if path.with_name(stem + suffix).is_file()]
    if partners:
        return VaeSource("taesd-files", (path, partners[0]) if own == "encoder" else (partners[0], path))
    if own == "decoder":
        return VaeSource("taesd-decoder", (path,))
    raise CheckpointError(f"{path} is a TAESD encoder; ldm needs its decoder too, as {stem}.pth or .safetensors beside it")


def _find_in_folder(folder: Path) -> VaeSource:
    if (folder / "model_index.json").is_file() or (folder / "unet").is_dir():
        raise CheckpointError(f"{folder} is a whole model folder, not a VAE; pass its vae/ folder or a VAE file as the VAE")
    if (folder / "config.json").is_file():
        return VaeSource("folder", (folder,))
    pairs = _taesd_pairs_in(folder)
    decoders = sorted(p for p in folder.iterdir() if p.suffix in VAE_SUFFIXES and p.is_file() and p.stem.endswith("decoder"))
    if not pairs and len(decoders) == 1:
        return VaeSource("taesd-decoder", (decoders[0],))
    if len(pairs) != 1:
        found = f"{len(pairs)} TAESD pairs ({', '.join(sorted(pairs))}); pass one of their files" if pairs else "no VAE"
        raise CheckpointError(
            f"{folder} holds {found}; a VAE folder has config.json (diffusers) or taesd_encoder and taesd_decoder files"
        )
    return VaeSource("taesd-files", next(iter(pairs.values())))


def _taesd_pairs_in(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Name -> (encoder, decoder) of each ``NAME_encoder.*`` / ``NAME_decoder.*`` pair in ``folder``."""
    files = sorted(p for p in folder.iterdir() if p.suffix in VAE_SUFFIXES and p.is_file())
    encoders = {p.stem.removesuffix("encoder").rstrip("_"): p for p in files if p.stem.endswith("encoder")}
    decoders = {p.stem.removesuffix("decoder").rstrip("_"): p for p in files if p.stem.endswith("decoder")}
    return {name: (encoders[name], decoders[name]) for name in encoders.keys() & decoders.keys()}


# --- loading ---------------------------------------------------------------------------------------


def _load_folder(source: VaeSource, check: Check, device: torch.device, dtype: torch.dtype) -> AutoencoderKL | TAESD:
    folder = source.paths[0]
    config = vae_folder_config(folder)
    check(config)
    return load_vae_folder(folder, config, device=device, dtype=dtype)


def _load_kl_file(source: VaeSource, check: Check, device: torch.device, dtype: torch.dtype, family: Family = "sd1") -> AutoencoderKL:
    """An original-layout KL-VAE file, read as the VAE part of a single file (``first_stage_model.``)."""
    path = source.paths[0]
    file = TensorFile(path)
    prefixed = any(key.startswith(keymap.VAE_PREFIX) for key in file.shapes)
    names = {
        key if prefixed else keymap.VAE_PREFIX + key: key
        for key in file.shapes
        if prefixed or not key.startswith(_IGNORED_PREFIXES)
    }
    own = {
        name: file.shapes[key]
        for name, key in names.items()
        if name.startswith(keymap.VAE_PREFIX) and not name.removeprefix(keymap.VAE_PREFIX).startswith(_IGNORED_PREFIXES)
    }
    config = built(VAEConfig.from_diffusers, vae_config(own, 512, family), f"the VAE of {path}")
    check(config)
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    def read(name: str) -> torch.Tensor:
        return file.read(names[name])

    load_entries(vae, keymap.vae_entries(shapes_of(vae)), own, read, device=device, dtype=dtype, where=f"VAE {path}")
    return _finished(vae)


def _load_taesd_files(source: VaeSource, check: Check, device: torch.device, dtype: torch.dtype) -> TAESD:
    """TAESD from its original ``taesd_encoder`` and ``taesd_decoder`` files."""
    files = dict(zip(_TAESD_PARTS, (TensorFile(path) for path in source.paths)))
    for part, file in files.items():
        if keymap.vae_layout(set(file.shapes)) != f"taesd-{part}":
            raise CheckpointError(f"{file.path} is not a TAESD {part} file; pass the taesd_{part} file beside its partner")
    config = built(
        TAESDConfig.from_diffusers, taesd_config(files["encoder"].shapes, files["decoder"].shapes), f"TAESD {source.paths[1]}"
    )
    check(config)
    with torch.device("meta"):
        vae = TAESD(config)
    for part, network in (("encoder", vae.encoder), ("decoder", vae.decoder)):
        file = files[part]
        entries = keymap.taesd_entries(shapes_of(network), part)
        load_entries(network, entries, file.shapes, file.read, device=device, dtype=dtype, where=f"TAESD {part} {file.path}")
    return _finished(vae)


def _load_taesd_decoder(source: VaeSource, check: Check, device: torch.device, dtype: torch.dtype) -> TAESD:
    """TAESD from its ``taesd_decoder`` file alone: it decodes (and previews); ``encode`` refuses."""
    file = TensorFile(source.paths[0])
    if keymap.vae_layout(set(file.shapes)) != "taesd-decoder":
        raise CheckpointError(f"{file.path} is not a TAESD decoder file")
    config = built(TAESDConfig.from_diffusers, taesd_decoder_config(file.shapes), f"TAESD {file.path}")
    check(config)
    with torch.device("meta"):
        vae = TAESD(config)
    vae.encoder = None
    entries = keymap.taesd_entries(shapes_of(vae.decoder), "decoder")
    load_entries(vae.decoder, entries, file.shapes, file.read, device=device, dtype=dtype, where=f"TAESD decoder {file.path}")
    return _finished(vae)


def _finished(vae: AutoencoderKL | TAESD) -> AutoencoderKL | TAESD:
    for key, tensor in [*vae.named_parameters(), *vae.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"VAE tensor {key} was not loaded")
    return vae.eval()


_LOADERS: dict[VaeKind, Callable[..., AutoencoderKL | TAESD]] = {
    "folder": _load_folder,
    "kl-file": _load_kl_file,
    "taesd-files": _load_taesd_files,
    "taesd-decoder": _load_taesd_decoder,
}
