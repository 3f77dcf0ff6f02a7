"""Cheap previews of a generation while it samples: the step's denoised latents as a small RGB image.

Decoding with the KL-VAE at every step would cost more than the step. A preview maps each latent
pixel to a colour with a fixed linear map, one 4x3 matrix multiply: SD 1.x / 2.x latents are
close to a linear function of the image's colour at 1/8 of its size. The factors are the ones
ComfyUI and A1111 use for SD 1.x ("latent_rgb_factors", fitted by least squares on VAE latents of
real images); they are a fact about SD's VAE, not something ldm trained. The preview is 1/8 of
the image's size; it shows composition and colour, not detail. When the model's VAE is TAESD (a
tiny decoder, ``--vae taesd/``), ``preview`` decodes with it instead: full size, with detail, for
about the cost of one small convolution stack.

``ldm txt2img --preview FILE`` rewrites one PNG atomically after every step (the first image of the
batch); the file carries a ``ldm-preview`` text chunk, and any other existing file is never overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin

from ldm.errors import InputError
from ldm.images import check_output_folder, to_pil
from ldm.io import atomic_write

if TYPE_CHECKING:  # torch is imported where it is used: the command line checks --preview before importing it
    import torch

# Rows: latent channels 0-3; columns: R, G, B (in [-1, 1] before the shift to [0, 1]).
SD_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_preview(denoised: torch.Tensor) -> list[Image.Image]:
    """One preview per image of scaled latents (B, 4, h, w): an h x w RGB image each."""
    import torch

    if denoised.shape[1] != len(SD_LATENT_RGB_FACTORS):
        raise ValueError(f"the linear preview maps {len(SD_LATENT_RGB_FACTORS)} latent channels, got {denoised.shape[1]}")
    factors = torch.tensor(SD_LATENT_RGB_FACTORS, dtype=torch.float32, device=denoised.device)
    rgb = torch.einsum("bchw,cr->brhw", denoised.float(), factors)
    return to_pil(((rgb + 1) / 2).clamp(0, 1))


def preview(vae, denoised: torch.Tensor) -> Image.Image | None:
    """The first image's preview: decoded by TAESD when that is the model's VAE (a cheap decoder,
    full size), else the linear map at 1/8 size; None for latents the linear map cannot show."""
    import torch

    from ldm.models.taesd import TAESD

    if isinstance(vae, TAESD):
        with torch.no_grad():
            image = vae.decode(denoised[:1].to(next(vae.parameters()).dtype) / vae.config.scaling_factor)
        return to_pil((image.float() / 2 + 0.5).clamp(0, 1))[0]
    if denoised.shape[1] != len(SD_LATENT_RGB_FACTORS):
        return None
    return latent_preview(denoised[:1])[0]


PREVIEW_KEY = "ldm-preview"  # the PNG text chunk that marks a file as a preview ldm may rewrite


def write_preview(image: Image.Image, path: Path) -> None:
    """Write ``image`` to ``path`` atomically (a viewer never sees half a file), replacing an earlier preview."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PREVIEW_KEY, "1")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite=True)


def check_preview_path(path: Path, name: str = "--preview") -> None:
    """A preview path is a new file, or an earlier preview: any other file is never overwritten."""
    if path.is_dir():
        raise InputError(f"{name} {path} is a folder; give a .png file path")
    if path.exists() and not _is_preview(path):
        raise InputError(f"{name} {path} exists and is not an ldm preview; choose another path (it is rewritten every step)")
    check_output_folder(path.parent if str(path.parent) else ".", name)


def _is_preview(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.info.get(PREVIEW_KEY) == "1"
    except OSError:
        return False
