"""Images in and out: reading any image as RGB, tensor <-> PIL, and PNGs that carry their parameters.

``read_image`` is the one way ldm reads a user's image (init images and training data alike): it
refuses decompression bombs, applies the EXIF orientation, scales 16-bit greyscale down to 8 bits
and composites transparency on white.

Each PNG stores its generation parameters in a ``parameters`` text chunk, in
the format AUTOMATIC1111's web UI and stable-diffusion.cpp write, so those tools
(and image viewers that know them) read the prompt and settings back::

    a photo of a cat
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: ldm-shapes

The last line is ``key: value`` pairs separated by ``, ``; a value containing a
comma, a colon or a newline is written as a JSON string, as A1111 does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from ldm.errors import InputError
from ldm.io import atomic_write, next_free_path

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads init images before importing it
    import torch

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# One "key: value" item of the settings line; the value is a JSON string or runs to the next comma.
_SETTING = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class GenerationParameters:
    """What made an image, as written to and read from the PNG ``parameters`` chunk."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # A1111 sampler name, e.g. "DPM++ 2M"
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str  # model folder or file stem
    extra: dict[str, str] = field(default_factory=dict)  # further A1111 keys, e.g. "Denoising strength"


def format_parameters(params: GenerationParameters) -> str:
    """The A1111 ``parameters`` text for ``params``."""
    settings = {
        "Steps": str(params.steps),
        "Sampler": params.sampler,
        "CFG scale": f"{params.cfg_scale:g}",
        "Seed": str(params.seed),
        "Size": f"{params.width}x{params.height}",
        "Model": params.model,
        **params.extra,
    }
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {params.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> GenerationParameters:
    """Read back A1111 / stable-diffusion.cpp ``parameters`` text; raises ``InputError`` if it is not one."""
    lines = text.strip().split("\n")
    settings = dict(_SETTING.findall(lines[-1])) if lines else {}
    required = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
    if any(key not in settings for key in required):
        raise InputError("the text is not A1111-style generation parameters (no 'Steps: ..., Seed: ...' line)")
    settings = {key: _unquote(value) for key, value in settings.items()}
    prompt_lines, negative_lines = [], []
    for line in lines[:-1]:
        if negative_lines or line.startswith(NEGATIVE_PREFIX):
            negative_lines.append(line.removeprefix(NEGATIVE_PREFIX).lstrip() if not negative_lines else line)
        else:
            prompt_lines.append(line)
    width, height = (int(v) for v in settings.pop("Size").split("x"))
    return GenerationParameters(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines),
        steps=int(settings.pop("Steps")),
        sampler=settings.pop("Sampler"),
        cfg_scale=float(settings.pop("CFG scale")),
        seed=int(settings.pop("Seed")),
        width=width,
        height=height,
        model=settings.pop("Model", ""),
        extra=settings,
    )


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) > 1:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parameters_chunk(params: GenerationParameters) -> PngImagePlugin.PngInfo:
    """The PNG text chunks of an image made with ``params``: A1111's ``parameters``."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, format_parameters(params))
    return info


def save_png(image: Image.Image, folder: str | Path, params: GenerationParameters) -> Path:
    """Write ``image`` as ``folder/NNNNN-<seed>.png`` with its parameters; never overwrites.

    The number is one above the highest already in ``folder``; if another
    process takes the same name first, the next number is tried.
    """
    info = parameters_chunk(params)
    for _ in range(100):
        path = next_free_path(folder, str(params.seed), ".png")
        try:
            return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
        except FileExistsError:
            continue
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}; choose another output folder") from None
    raise InputError(f"could not find a free file name in {folder}; is another process writing there?")


def check_output_folder(folder: str | Path, name: str = "the output folder") -> None:
    """Raise ``InputError`` unless ``folder`` is, or can be made as, a writable folder.

    Checked before a generation starts, so a wrong ``--out`` does not cost the whole run.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{name} {folder}: {existing} is a file, not a folder; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{name} {folder}: {existing} is not writable; choose a folder you can write to")


def read_parameters(path: str | Path) -> GenerationParameters:
    """The generation parameters stored in a PNG written by ldm, A1111 or stable-diffusion.cpp."""
    with open_image(path) as image:
        text = image.info.get(PARAMETERS_KEY)
    if text is None:
        raise InputError(f"{path} has no '{PARAMETERS_KEY}' text chunk")
    return parse_parameters(text)


def init_image_size(
    image: Image.Image, width: int | None, height: int | None, factor: int, name: str = "init image"
) -> tuple[int | None, int | None]:
    """The size an init image sets: ``width`` / ``height`` where given, else the image's rounded down to
    a multiple of ``factor`` (the VAE's downsampling); an image smaller than ``factor`` is refused."""
    if min(image.size) < factor:
        raise InputError(f"{name} of {image.width}x{image.height} is too small; it needs at least {factor}x{factor} pixels")
    return (image.width - image.width % factor if width is None else width,
            image.height - image.height % factor if height is None else height)


def open_image(path: str | Path) -> Image.Image:
    """Open and decode an image file, or raise ``InputError`` saying why it cannot be read.

    An image of more than PIL's ``Image.MAX_IMAGE_PIXELS`` (about 89 million pixels, 268 MB as
    RGB) is refused before it is decoded: a small PNG can claim gigapixels (a decompression bomb).
    It is checked from the header rather than by turning PIL's warning into an error, since
    warning filters are process-wide and pipelines may read images from several threads.
    """
    too_large = f"image {path} has more than {Image.MAX_IMAGE_PIXELS} pixels, too many to decode safely; scale it down first"
    try:
        image = Image.open(path)  # reads the header only; PIL itself refuses twice the limit
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except Image.DecompressionBombError:
        raise InputError(too_large) from None
    except Exception as error:  # PIL raises many unrelated types (OSError, ValueError, SyntaxError, ...) for broken files
        raise InputError(f"cannot read image {path}: {error}") from None
    with _closed_on_error(image):
        if image.width * image.height > Image.MAX_IMAGE_PIXELS:
            raise InputError(too_large)
        try:
            image.load()
        except Exception as error:  # a truncated or corrupt body, found while decoding
            raise InputError(f"cannot read image {path}: {error}") from None
    return image


@contextmanager
def _closed_on_error(image: Image.Image) -> Iterator[None]:
    """Close ``image``'s file if the block raises (a refused image's file is never left open)."""
    try:
        yield
    except BaseException:
        image.close()
        raise


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, upright: grayscale, palette, CMYK, 16-bit and transparent images included.

    The EXIF orientation is applied (a phone photo's pixels are stored sideways). Transparent pixels
    are composited on white (what a viewer shows), not on whatever colour the invisible pixels
    happen to store.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255 instead of rescaling them.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """The image file at ``path`` as upright 8-bit RGB (``open_image``, then ``to_rgb``)."""
    return to_rgb(open_image(path))


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB PIL image as a ``(1, 3, height, width)`` float tensor in [-1, 1], resized with Lanczos if needed."""
    import torch

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` images in [0, 1] as a float32 ``(B, H, W, 3)`` array."""
    import torch

    return images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` images in [0, 1] as 8-bit RGB PIL images (rounded to the nearest level)."""
    array = (to_numpy(images) * 255).round().astype(np.uint8)
    return [Image.fromarray(item) for item in array]
