"""Mask images for inpainting and outpainting: read, threshold, blur, crop, fill and pad (PIL and numpy, no torch).

White repaints, black keeps. The operations are the ones AUTOMATIC1111's img2img applies to a mask
(``modules/processing.py``, ``modules/masking.py``, ``modules/images.py``) and diffusers'
``VaeImageProcessor`` applies for ``StableDiffusionInpaintPipeline`` (``get_crop_region``,
``_resize_and_fill``, ``_resize_and_crop``, ``apply_overlay``), written so that the same mask gives
the same pixels:

    mask_channel   the alpha of a transparent image (what A1111's sketch pad paints), else its luminance
    binarize       >= 128 of 255 repaints (diffusers' binarize at 0.5; A1111 rounds its latent mask)
    blur           A1111's mask blur: a Gaussian of sigma = radius pixels, 2 * int(2.5 sigma + 0.5) + 1 taps,
                   mirrored borders (OpenCV's default), x then y, rounded to 8 bits after each
    crop_region    "only masked": the mask's bounding box, padded, widened to the generation's aspect ratio
    resize_fill    fit inside, centre, stretch the edge rows or columns into the rest (A1111's resize mode 2)
    resize_crop    cover, centre, cut the excess (A1111's resize mode 1)
    fill           A1111's "fill": the masked area painted with the blurred colours around it
    pad_edges      outpainting's canvas: the image with its edge pixels repeated outward
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

THRESHOLD = 128  # of 255: a mask value that repaints
# A1111's "fill": (blur radius, times composited), coarse to fine, so near colours win over far ones.
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2 and y2 exclusive


def mask_channel(image: Image.Image) -> Image.Image:
    """A mask image as one 8-bit channel ("L"), upright: its alpha where it has transparency, else its luminance."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("P", "PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float greys, rescaled to 8 bits
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I") else 1.0
        return Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("L")


def binarize(mask: Image.Image) -> Image.Image:
    """255 where the mask is at least ``THRESHOLD``, else 0."""
    return mask.point(lambda v: 255 if v >= THRESHOLD else 0)


def invert(mask: Image.Image) -> Image.Image:
    return ImageOps.invert(mask)


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's mask blur of ``radius`` pixels (see the module docstring); 0 leaves the mask as it is."""
    if radius <= 0:
        return mask
    half = int(2.5 * radius + 0.5)
    taps = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2.0 * radius * radius))
    kernel /= kernel.sum()
    values = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        padding = [(0, 0), (0, 0)]
        padding[axis] = (half, half)
        mirrored = np.pad(values, padding, mode="reflect")  # mirrors about the edge pixel: OpenCV's BORDER_REFLECT_101
        windows = np.lib.stride_tricks.sliding_window_view(mirrored, len(kernel), axis=axis)
        values = np.clip(np.rint(windows @ kernel), 0, 255)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def crop_region(mask: Image.Image, pad: int, width: int, height: int) -> Box | None:
    """The box "only masked" repaints: the mask's nonzero pixels' bounding box grown by ``pad`` (inside the image),
    then widened or heightened to the ``width`` : ``height`` ratio it is generated at; None for a blank mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    x1, y1, x2, y2 = max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grown(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), mask.height)
    else:
        x1, x2 = _grown(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _grown(low: int, high: int, grow: int, size: int) -> tuple[int, int]:
    """The span [low, high) grown by ``grow`` pixels, centred, then slid (and cut) to fit in [0, size)."""
    low, high = low - grow // 2, high + grow - grow // 2
    if high >= size:
        low, high = low - (high - size), size
    if low < 0:
        low, high = 0, high - low
    return low, min(high, size)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` fitted inside width x height (Lanczos), centred, its edge rows or columns stretched over the rest."""
    ratio, source_ratio = width / height, image.width / image.height
    fitted_w = width if ratio < source_ratio else image.width * height // image.height
    fitted_h = height if ratio >= source_ratio else image.height * width // image.width
    fitted = image.resize((fitted_w, fitted_h), resample=Image.Resampling.LANCZOS)
    result = Image.new(image.mode, (width, height))
    result.paste(fitted, box=(width // 2 - fitted_w // 2, height // 2 - fitted_h // 2))
    if ratio < source_ratio:
        band = height // 2 - fitted_h // 2
        if band > 0:  # the top and bottom rows, stretched
            result.paste(fitted.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            result.paste(fitted.resize((width, band), box=(0, fitted.height, width, fitted.height)), box=(0, band + fitted_h))
    elif ratio > source_ratio:
        band = width // 2 - fitted_w // 2
        if band > 0:  # the left and right columns, stretched
            result.paste(fitted.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            result.paste(fitted.resize((band, height), box=(fitted.width, 0, fitted.width, height)), box=(band + fitted_w, 0))
    return result


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled (Lanczos) to cover width x height, centred, the excess cut off."""
    ratio, source_ratio = width / height, image.width / image.height
    scaled_w = width if ratio > source_ratio else image.width * height // image.height
    scaled_h = height if ratio <= source_ratio else image.height * width // image.width
    scaled = image.resize((scaled_w, scaled_h), resample=Image.Resampling.LANCZOS)
    result = Image.new(image.mode, (width, height))
    result.paste(scaled, box=(width // 2 - scaled_w // 2, height // 2 - scaled_h // 2))
    return result


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it.

    The kept pixels (alpha = 255 - mask, premultiplied) are blurred at falling radii and each blur laid
    over the last: a normalized convolution, so a masked pixel takes the average colour of the kept
    pixels near it, from the nearest scale that has any. The kept pixels come out as they were.
    """
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=invert(mask))
    result = Image.new("RGBA", image.size)
    for radius, times in FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            result.alpha_composite(layer)
    return result.convert("RGB")


def pad_edges(image: Image.Image, left: int, right: int, top: int, bottom: int) -> Image.Image:
    """``image`` on a canvas grown by the given pixels, its edge pixels repeated outward (outpainting's start)."""
    array = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge"), mode="RGB")


def outpaint_mask(width: int, height: int, pads: tuple[int, int, int, int], overlap: int) -> Image.Image:
    """The mask of an outpainted canvas: white in the added borders and ``overlap`` pixels into the image along
    each grown side (A1111's outpainting scripts overlap by twice the mask blur, so the seam is repainted)."""
    left, right, top, bottom = pads
    mask = np.full((height, width), 255, dtype=np.uint8)
    x1, x2 = left + (overlap if left else 0), width - right - (overlap if right else 0)
    y1, y2 = top + (overlap if top else 0), height - bottom - (overlap if bottom else 0)
    mask[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = 0
    return Image.fromarray(mask, mode="L")
