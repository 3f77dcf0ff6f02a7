"""An inpainting or outpainting call's choices (``GenerationSettings.inpaint``), checked, and the images they make.

``Inpaint`` holds AUTOMATIC1111's img2img inpainting options under its names: the ``mask`` (white
repaints) or an ``outpaint`` (pixels to add on each side), ``mask_blur``, ``inpainting_fill``,
``inpaint_full_res`` ("Inpaint area: Only masked") with ``inpaint_full_res_padding``, and
``inpainting_mask_invert``. ``Inpaint.plan`` turns it and the init image into a ``MaskPlan``: the
image and mask the generation works on, and how its result is laid back over the original. The
denoising side (masked latents, blending, the paste) is ``ldm.pipeline.inpaint``. Torch-free, like
``ldm.settings``, so a bad mask is refused before anything is loaded.

What each choice does, in A1111's order (``StableDiffusionProcessingImg2Img.init``):

    1. the mask: its alpha where it is transparent, else its luminance (``ldm.masks.mask_channel``),
       resized to the init image if its size differs (with a warning, and "Mask resized from" in the
       metadata), then thresholded: >= 128 of 255 repaints. A grey mask is not used soft: diffusers
       binarizes at 0.5 and A1111 rounds the mask the model sees, which is the same threshold.
    2. inverted with ``inpainting_mask_invert`` ("Mask mode: Inpaint not masked").
    3. blurred by ``mask_blur`` pixels: the model repaints where the blurred mask is >= 128; the result
       is laid over the original with the blurred mask (doubled, "whole picture") as its opacity.
    4. "only masked": the blurred mask's box, padded and widened to the generation's aspect ratio, is
       cut out, generated at width x height, scaled back and pasted (diffusers' ``padding_mask_crop``).
    5. ``inpainting_fill``: "fill" paints the masked area with the colours around it before encoding;
       "latent-noise" and "latent-nothing" do too (as A1111 does for every mode but "original"), then
       replace the latents the latent mask covers with the seed's noise or zeros; "original" keeps the image.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from PIL import Image

from ldm import checks, masks
from ldm.errors import SettingError
from ldm.images import init_image_size, open_image

Fill = Literal["fill", "original", "latent-noise", "latent-nothing"]
FILLS = get_args(Fill)  # in the order of A1111's inpainting_fill 0..3
# "Masked content" as A1111 writes it; it writes nothing for "original".
FILL_INFOTEXT = {"fill": "fill", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}
MAX_BLUR = 64  # A1111's slider
MAX_PADDING = 1024
MAX_OUTPAINT = 2048  # pixels on one side


@dataclass(frozen=True)
class MaskPlan:
    """The images one inpainting call works on (PIL), made by ``Inpaint.plan``.

    ``image`` and ``mask`` are at the generation's size: what the VAE encodes (filled as the call
    asks) and the blurred mask (the model repaints where it is >= 128). The result goes back over
    ``original`` (the output's size) with ``overlay`` as its opacity: whole, or, with ``crop``, scaled
    back into that box first.
    """

    image: Image.Image  # RGB, width x height
    mask: Image.Image  # L, width x height
    original: Image.Image  # RGB, the output's size
    overlay: Image.Image  # L, the output's size: 255 takes the generated pixel, 0 keeps the original
    crop: masks.Box | None = None  # "only masked": where the generated image goes in the output


@dataclass(frozen=True)
class Inpaint:
    """A call's inpainting (``mask``) or outpainting (``outpaint``) and A1111's options for it.

    ``mask``: a PIL image or a file; white (>= 128 of 255) is repainted, black kept; a transparent
    image's alpha is its mask. ``outpaint``: (left, right, top, bottom) pixels, multiples of 8, added
    to the init image (its edge pixels repeated outward) and repainted with ``2 * mask_blur`` pixels of
    overlap; the output is the grown size.
    """

    mask: Any = None
    outpaint: tuple[int, int, int, int] | None = None
    mask_blur: int = 4  # A1111's default
    inpainting_fill: Fill = "original"  # what the masked area starts from: A1111's "Masked content"
    inpaint_full_res: bool = False  # generate only the masked area's box, at the call's width x height
    inpaint_full_res_padding: int = 32  # pixels around the mask's box (A1111's default in its UI)
    inpainting_mask_invert: bool = False  # repaint the black part instead
    mask_resized_from: tuple[int, int] | None = None  # set by ``fitted``: the mask's size, when it was not the image's

    def __post_init__(self) -> None:
        if (self.mask is None) == (self.outpaint is None):
            raise SettingError("give a {mask} or an {outpaint}" if self.mask is None else "give a {mask} or an {outpaint}, not both")
        if self.mask is not None:
            object.__setattr__(self, "mask", _mask_image(self.mask))
        else:
            object.__setattr__(self, "outpaint", _checked_outpaint(self.outpaint))
        checks.integer(self.mask_blur, "mask_blur")
        if not 0 <= self.mask_blur <= MAX_BLUR:
            raise SettingError(f"{{mask_blur}} must be from 0 to {MAX_BLUR} pixels, got {self.mask_blur}")
        if self.inpainting_fill not in FILLS:
            raise SettingError(f"{{inpainting_fill}} must be one of {', '.join(FILLS)}, got {checks.shown(self.inpainting_fill)}")
        checks.integer(self.inpaint_full_res_padding, "inpaint_full_res_padding")
        if not 0 <= self.inpaint_full_res_padding <= MAX_PADDING:
            raise SettingError(f"{{inpaint_full_res_padding}} must be from 0 to {MAX_PADDING} pixels, got {self.inpaint_full_res_padding}")
        for name in ("inpaint_full_res", "inpainting_mask_invert"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(f"{{{name}}} must be true or false, got {checks.shown(getattr(self, name))}")
        if self.mask is not None and self.binary_mask().getbbox() is None:
            inverted = " once {inpainting_mask_invert} inverts it" if self.inpainting_mask_invert else ""
            raise SettingError(f"{{mask}} is black everywhere{inverted}: nothing to repaint; paint the area to change white")

    def binary_mask(self) -> Image.Image:
        """The mask thresholded (and inverted when asked): 255 repaints, 0 keeps."""
        binary = masks.binarize(self.mask)
        return masks.invert(binary) if self.inpainting_mask_invert else binary

    def fitted(self, image: Image.Image) -> Inpaint:
        """These choices for ``image``: a mask of another size resized to it (Lanczos, as A1111 resizes it), with a warning."""
        if self.mask is None or self.mask.size == image.size:
            return self
        warnings.warn(
            f"the mask is {self.mask.width}x{self.mask.height} but the init image {image.width}x{image.height}; "
            "resized the mask to the image (as A1111 does)",
            stacklevel=4,
        )
        resized = self.mask.resize(image.size, resample=Image.Resampling.LANCZOS)
        return replace(self, mask=resized, mask_resized_from=self.mask.size)

    def size(self, image: Image.Image, width: int | None, height: int | None, native_side: int, factor: int) -> tuple[int, int]:
        """The generation's size: the init image's grown by the outpainting, "only masked"'s width x height (else
        the model's native side), or the init image's (``width`` / ``height`` where given)."""
        if self.outpaint is not None:
            left, right, top, bottom = self.outpaint
            base_w, base_h = init_image_size(image, None, None, factor)
            return base_w + left + right, base_h + top + bottom
        if self.inpaint_full_res:
            return width or native_side, height or native_side
        return init_image_size(image, width, height, factor)

    def plan(self, image: Image.Image, width: int, height: int) -> MaskPlan:
        """The images a call of width x height works on, from the init image (see the module docstring)."""
        if self.outpaint is not None:
            left, right, top, bottom = self.outpaint
            base = (width - left - right, height - top - bottom)  # the init image's size, rounded down to the factor
            if image.size != base:
                image = image.resize(base, resample=Image.Resampling.LANCZOS)
            image = masks.pad_edges(image, left, right, top, bottom)
            binary = masks.outpaint_mask(width, height, self.outpaint, 2 * self.mask_blur)
        else:
            binary = self.binary_mask()
        blurred = masks.blur(binary, self.mask_blur)
        if self.inpaint_full_res:
            box = masks.crop_region(blurred, self.inpaint_full_res_padding, width, height)
            mask = masks.resize_fill(blurred.crop(box), width, height)
            return MaskPlan(self._filled(masks.resize_fill(image.crop(box), width, height), mask), mask, image, blurred, box)
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
            blurred = blurred.resize((width, height), resample=Image.Resampling.LANCZOS)
        overlay = blurred.point(lambda v: min(2 * v, 255))  # A1111: the blurred mask, doubled, is the paste's opacity
        return MaskPlan(self._filled(image, blurred), blurred, image, overlay)

    def _filled(self, image: Image.Image, mask: Image.Image) -> Image.Image:
        # A1111 fills for every mode but "original" (processing.py: ``if self.inpainting_fill != 1``): the latent
        # modes replace only the latents the latent mask covers, so the fill shows in z_0 along the mask's border.
        return image if self.inpainting_fill == "original" else masks.fill(image, mask)

    def infotext(self) -> dict[str, str]:
        """A1111's infotext keys for these choices (each only where A1111 writes it), and ldm's for outpainting."""
        extra = {}
        if self.mask_blur > 0:
            extra["Mask blur"] = str(self.mask_blur)
        if self.inpainting_mask_invert:
            extra["Mask mode"] = "Inpaint not masked"
        if self.inpaint_full_res:
            extra["Inpaint area"] = "Only masked"
            extra["Masked area padding"] = str(self.inpaint_full_res_padding)
        if self.inpainting_fill in FILL_INFOTEXT:
            extra["Masked content"] = FILL_INFOTEXT[self.inpainting_fill]
        if self.outpaint is not None:
            extra["Outpaint"] = ",".join(str(side) for side in self.outpaint)  # left,right,top,bottom, as --outpaint takes it
        if self.mask_resized_from is not None:
            extra["Mask resized from"] = "{}x{}".format(*self.mask_resized_from)
        return extra


# Each option's default, written once in Inpaint: the command line's flags use these.
INPAINT_DEFAULTS = {f.name: f.default for f in fields(Inpaint) if f.name not in ("mask", "outpaint", "mask_resized_from")}


def as_inpaint(mask: Inpaint | Image.Image | str | Path | None) -> Inpaint | None:
    """``Pipeline.__call__``'s ``mask``: an ``Inpaint`` as it is, an image or path as a mask with A1111's options."""
    return mask if mask is None or isinstance(mask, Inpaint) else Inpaint(mask=mask)


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """``--outpaint LEFT,RIGHT,TOP,BOTTOM`` as four integers; the values are checked by ``Inpaint``."""
    expected = "four pixel counts LEFT,RIGHT,TOP,BOTTOM (multiples of 8), e.g. 0,128,0,0"
    return checks.integers(text, 4, "outpaint", expected)  # type: ignore[return-value]


def _mask_image(mask: Any) -> Image.Image:
    """The mask as one 8-bit channel, read from a file if it is a path."""
    if isinstance(mask, (str, Path)):
        mask = open_image(mask)
    if not isinstance(mask, Image.Image):
        raise SettingError(f"{{mask}} must be a PIL image or an image file's path, got {type(mask).__name__}")
    return masks.mask_channel(mask)


def _checked_outpaint(pads: Any) -> tuple[int, int, int, int]:
    pads = tuple(pads) if isinstance(pads, (tuple, list)) else (pads,)
    if len(pads) != 4:
        raise SettingError(f"{{outpaint}} takes four pixel counts (left, right, top, bottom), got {checks.shown(pads)}")
    pads = tuple(checks.integer(side, "outpaint") for side in pads)
    if any(side < 0 or side % 8 or side > MAX_OUTPAINT for side in pads) or not any(pads):
        raise SettingError(
            f"{{outpaint}} pixels must be multiples of 8 from 0 to {MAX_OUTPAINT}, at least one above 0 "
            f"(the latents are 1/8 of the image), got {','.join(str(side) for side in pads)}"
        )
    return pads
