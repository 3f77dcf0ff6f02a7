"""ControlNet units: what one ControlNet does in a call, checked without torch, and its control map.

A ``ControlUnit`` names a ControlNet (a file, a diffusers folder, or a name given to
``Pipeline.load_controlnet``), its image, how the image becomes a control map (``preprocess``,
``resize_mode``) and how strongly and when the network steers (``scale``, ``start``/``end``,
``mode``). A call takes any number of units; their residuals are summed (diffusers'
``MultiControlNetModel``). The network side is ``ldm.pipeline.control``.

Choices, as diffusers and AUTOMATIC1111's sd-webui-controlnet extension make them:

- ``scale`` is diffusers' ``controlnet_conditioning_scale`` (the extension's "Weight"), 0 to 2.
- ``start``/``end`` are diffusers' ``control_guidance_start``/``end``: the unit acts at step i of n
  unless i / n < start or (i + 1) / n > end.
- ``mode`` is the extension's "Control Mode": ``"balanced"``; ``"prompt"`` ("My prompt is more
  important": residual k of the 13 scaled by 10^((k - 12) / 12), the original ControlNet's
  0.825^(12 - k)); ``"controlnet"`` ("ControlNet is more important", diffusers' ``guess_mode=True``:
  those scales, and the residuals added to the conditional batch only).
- ``resize_mode``: the image to the output size as diffusers' ``VaeImageProcessor`` resizes it
  (Lanczos), in A1111's three modes: ``"resize"`` (stretch, diffusers' default and the extension's
  "Just Resize"), ``"crop"`` (cover and crop the overflow, "Crop and Resize"), ``"fill"`` (fit and
  stretch the edges into the rest, "Resize and Fill").
- ``preprocess``: ``"none"`` (the image is the control map, as diffusers takes it) or ``"canny"``
  (``cv2.Canny`` with A1111's thresholds 100 / 200, on the resized image: the edges land on the
  output's pixels, as the extension's "Pixel Perfect" runs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from ldm import checks
from ldm.errors import InputError, SettingError, placeholder_text
from ldm.images import read_image, to_rgb

ControlMode = Literal["balanced", "prompt", "controlnet"]
Preprocess = Literal["none", "canny"]
ResizeMode = Literal["resize", "crop", "fill"]
Crop = tuple[tuple[int, int], tuple[int, int, int, int]]  # (canvas width, height), (x1, y1, x2, y2) of it
# How the extension's infotext and API name each choice.
CONTROL_MODE_NAMES = {"balanced": "Balanced", "prompt": "My prompt is more important", "controlnet": "ControlNet is more important"}
RESIZE_MODE_NAMES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
CANNY_THRESHOLDS = (100, 200)  # A1111's defaults (low, high)
MAX_SCALE = 2.0  # the extension's weight slider ends at 2


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a call. ``image``: a PIL image or a path, read as RGB; with ``preprocess="none"`` it is the
    control map itself (white edges on black for a canny ControlNet)."""

    model: str | Path  # a ControlNet file (.safetensors, .pth, ...), a diffusers folder, or a load_controlnet name
    image: Any
    preprocess: Preprocess = "none"
    scale: float = 1.0  # diffusers' controlnet_conditioning_scale
    start: float = 0.0  # diffusers' control_guidance_start: the fraction of the steps before the unit acts
    end: float = 1.0  # control_guidance_end: the fraction of the steps after which it stops
    mode: ControlMode = "balanced"  # "controlnet" is diffusers' guess_mode=True
    resize_mode: ResizeMode = "resize"
    thresholds: tuple[int, int] = CANNY_THRESHOLDS  # canny's (low, high)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path)) or not str(self.model):
            raise SettingError(f"{{control.model}} must name a ControlNet file, folder or loaded name, got {checks.shown(self.model)}")
        object.__setattr__(self, "image", _read(self.image))
        for name, choices in (("preprocess", Preprocess), ("mode", ControlMode), ("resize_mode", ResizeMode)):
            if getattr(self, name) not in get_args(choices):
                shown = checks.shown(getattr(self, name))
                raise SettingError(f"{{control.{name}}} must be one of {', '.join(get_args(choices))}, got {shown}")
        object.__setattr__(self, "scale", _between(self.scale, "scale", MAX_SCALE))
        start, end = _between(self.start, "start", 1.0), _between(self.end, "end", 1.0)
        if start >= end:
            raise SettingError(f"{{control.start}} {start:g} must be below {{control.end}} {end:g}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        self._check_thresholds()

    def _check_thresholds(self) -> None:
        thresholds = tuple(self.thresholds) if isinstance(self.thresholds, (list, tuple)) else None
        if thresholds is None or len(thresholds) != 2:
            raise SettingError(f"{{control.thresholds}} must be two numbers (low, high), got {checks.shown(self.thresholds)}")
        low, high = (checks.integer(value, "control.thresholds") for value in thresholds)
        if not 1 <= low <= high <= 255:
            raise SettingError(f"{{control.thresholds}} must be 1 <= low <= high <= 255, got {low}, {high}")
        if (low, high) != CANNY_THRESHOLDS and self.preprocess != "canny":
            raise SettingError("{control.thresholds} are canny's; they apply with {control.preprocess} canny only")
        object.__setattr__(self, "thresholds", (low, high))

    def infotext(self, model: str) -> str:
        """The sd-webui-controlnet extension's infotext value of this unit, its model shown as ``model``
        (``"name [hash]"``). The preprocessor ran at the output size: the extension's "Pixel Perfect"."""
        fields = {"Module": self.preprocess, "Model": model, "Weight": f"{self.scale:g}", "Resize Mode": RESIZE_MODE_NAMES[self.resize_mode]}
        if self.preprocess == "canny":
            fields.update({"Threshold A": str(self.thresholds[0]), "Threshold B": str(self.thresholds[1])})
        fields.update({
            "Guidance Start": f"{self.start:g}", "Guidance End": f"{self.end:g}", "Pixel Perfect": "True",
            "Control Mode": CONTROL_MODE_NAMES[self.mode],
        })  # fmt: skip
        return ", ".join(f"{key}: {value}" for key, value in fields.items())


def control_units(value: Any) -> tuple[ControlUnit, ...]:
    """A call's units: none, one, or a sequence of them; a unit's error says which it is."""
    if value is None:
        return ()
    units = (value,) if isinstance(value, ControlUnit) else tuple(value) if isinstance(value, (list, tuple)) else None
    if units is None or not all(isinstance(unit, ControlUnit) for unit in units):
        raise SettingError(f"{{control}} takes ControlUnit objects, got {checks.shown(value)}")
    return units


def _between(value: Any, name: str, high: float) -> float:
    number = checks.finite(value, f"control.{name}")
    if not 0.0 <= number <= high:
        raise SettingError(f"{{control.{name}}} must be in [0, {high:g}], got {checks.shown(value)}")
    return number


def _read(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, Path)):
        try:
            return read_image(image)
        except InputError as error:
            raise SettingError(f"{{control.image}}: {placeholder_text(str(error))}") from None
    raise SettingError(f"{{control.image}} must be a PIL image or an image file's path, got {checks.shown(type(image).__name__)}")


# --- the control map --------------------------------------------------------------------------------


def control_map(unit: ControlUnit, width: int, height: int, crop: Crop | None = None) -> Image.Image:
    """The unit's image at the output size (``resize_mode``), then preprocessed: the map its ControlNet reads.

    ``crop``: "only masked" inpainting's (canvas size, box), where only the box of the init image (the canvas)
    is generated at width x height. The image is brought to the canvas first (``resize_mode``), cut to the box,
    then fitted to width x height as the init image's box is ("fill"): what diffusers' ControlNet inpainting does
    with ``padding_mask_crop`` (its ``crops_coords``) and the sd-webui-controlnet extension does with A1111's mask.
    """
    if crop is None:
        image = resized(unit.image, width, height, unit.resize_mode)
    else:
        (canvas_width, canvas_height), box = crop
        image = resized(resized(unit.image, canvas_width, canvas_height, unit.resize_mode).crop(box), width, height, "fill")
    if unit.preprocess == "canny":
        return canny(image, *unit.thresholds)
    return image


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """Canny's edges (Canny 1986) of an RGB image, white on black in three channels, as A1111 computes them:
    ``cv2.Canny`` on the RGB array (the strongest channel's gradient at each pixel)."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def resized(image: Image.Image, width: int, height: int, mode: ResizeMode = "resize") -> Image.Image:
    """``image`` at ``width`` x ``height`` as diffusers' ``VaeImageProcessor.resize`` makes it (Lanczos): stretched,
    cropped (cover, centred), or filled (fit, centred, the edge rows or columns stretched into the bands)."""
    lanczos = Image.Resampling.LANCZOS
    if mode == "resize":
        return image.resize((width, height), resample=lanczos)
    ratio, source = width / height, image.width / image.height
    if mode == "crop":
        w = width if ratio > source else image.width * height // image.height
        h = height if ratio <= source else image.height * width // image.width
    else:
        w = width if ratio < source else image.width * height // image.height
        h = height if ratio >= source else image.height * width // image.width
    inner = image.resize((w, h), resample=lanczos)
    result = Image.new("RGB", (width, height))
    result.paste(inner, box=(width // 2 - w // 2, height // 2 - h // 2))
    if mode == "fill":
        _fill_bands(result, inner, width, height, ratio, source)
    return result


def _fill_bands(result: Image.Image, inner: Image.Image, width: int, height: int, ratio: float, source: float) -> None:
    """Stretch the fitted image's first and last row (or column) over the empty bands around it."""
    w, h = inner.size
    if ratio < source and height // 2 - h // 2 > 0:
        band = height // 2 - h // 2
        result.paste(inner.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        result.paste(inner.resize((width, band), box=(0, h, width, h)), box=(0, band + h))
    elif ratio > source and width // 2 - w // 2 > 0:
        band = width // 2 - w // 2
        result.paste(inner.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        result.paste(inner.resize((band, height), box=(w, 0, w, height)), box=(band + w, 0))
