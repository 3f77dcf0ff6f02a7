"""SDXL's call options beyond the prompts: the micro-conditioning and where the run starts and ends.

SDXL (Podell et al. 2023, sec. 2.2) conditions its U-Net on numbers about the training image beside
the text: the size it had before it was resized (``original_size``), where it was cropped
(``crops_coords_top_left``) and the size the model made of it (``target_size``); the refiner takes an
aesthetic score in place of the target size. Each number is embedded as a timestep is. The
unconditional rows of classifier-free guidance get their own (``negative_*``), so a negative
condition ("a small, cropped, ugly image") can push away from it, as diffusers'
``StableDiffusionXLPipeline`` allows.

``denoising_end`` and ``denoising_start`` are diffusers' "ensemble of expert denoisers" (Balaji et
al. 2022, eDiff-I; diffusers' SDXL docs): the base runs the noisy first part of the schedule and
hands its latents to the refiner, which runs the rest (``ldm.pipeline.sdxl``).

Torch-free and checked when made: ``GenerationSettings.sdxl`` holds one; ``None`` fields take
diffusers' defaults for the call's size (``sizes``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ldm import checks
from ldm.errors import SettingError

Size = tuple[int, int]  # (height, width), diffusers' order

# The refiner's aesthetic scores (diffusers' StableDiffusionXLImg2ImgPipeline and A1111's
# sdxl_refiner_high/low_aesthetic_score defaults).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
DEFAULT_REFINER_SWITCH = 0.8  # A1111's "Switch at" default; diffusers' docs use 0.8 too


@dataclass(frozen=True)
class SdxlOptions:
    """The micro-conditioning of an SDXL call, and the part of the schedule it runs (diffusers' names and meaning)."""

    original_size: Size | None = None  # None: (height, width) of the call
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None  # None: (height, width); the base's (the refiner reads the aesthetic score)
    negative_original_size: Size | None = None  # the unconditional rows' numbers; None: the conditional rows'
    negative_crops_coords_top_left: Size | None = None
    negative_target_size: Size | None = None
    aesthetic_score: float = AESTHETIC_SCORE  # the refiner's
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    denoising_start: float | None = None  # (0, 1): start from given latents this far through the schedule
    denoising_end: float | None = None  # (0, 1): stop this far through it, leaving latents for a refiner

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_size", "_top_left")) and value is not None:
                object.__setattr__(self, f.name, _pair(value, f.name, positive=f.name.endswith("_size")))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            object.__setattr__(self, name, checks.finite(getattr(self, name), name))
        for name in ("denoising_start", "denoising_end"):
            value = getattr(self, name)
            if value is not None and not 0 < checks.finite(value, name) < 1:
                raise SettingError(f"{{{name}}} must be between 0 and 1 (a fraction of the schedule), got {checks.shown(value)}")
        if None not in (self.denoising_start, self.denoising_end) and self.denoising_start >= self.denoising_end:
            raise SettingError("{denoising_start} must be below {denoising_end}: the run starts before it ends")

    def time_ids(self, height: int, width: int, aesthetic: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The numbers of the conditional rows and of the unconditional ones: original size, crop, then the target
        size, or the aesthetic score for a U-Net that reads one (the refiner's, diffusers' ``requires_aesthetics_score``)."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        negative_crops = self.negative_crops_coords_top_left or (0, 0)  # diffusers' default, whatever the crop
        if aesthetic:  # diffusers' SDXL img2img pipeline: each negative size defaults to the conditional one
            cond = (*original, *self.crops_coords_top_left, self.aesthetic_score)
            negative = (*(self.negative_original_size or original), *negative_crops, self.negative_aesthetic_score)
        else:  # diffusers' SDXL pipeline: negative numbers only when both negative sizes are given, else the conditional ones
            cond = (*original, *self.crops_coords_top_left, *target)
            both = self.negative_original_size is not None and self.negative_target_size is not None
            negative = (*self.negative_original_size, *negative_crops, *self.negative_target_size) if both else cond
        return tuple(map(float, cond)), tuple(map(float, negative))

    def given(self) -> tuple[str, ...]:
        """The names of the fields that differ from their defaults, in field order."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) != f.default)

    def infotext(self) -> dict[str, str]:
        """What differs from the defaults, in A1111-style keys (A1111 itself writes none of these), each value as
        its ``ldm txt2img`` flag takes it: pairs in diffusers' order, comma-separated (``Original size: "2048,1536"``:
        height 2048, width 1536; not A1111's width x height "Size" form, which would read the other way)."""
        extra = {}
        for name in self.given():
            value = getattr(self, name)
            extra[name.replace("_", " ").capitalize()] = f"{value[0]},{value[1]}" if isinstance(value, tuple) else f"{value:g}"
        return extra


def _pair(value, name: str, positive: bool) -> Size:
    """(height, width) or (top, left): two integers, sizes above 0, crops 0 or more."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise SettingError(f"{{{name}}} must be two integers ({'height, width' if positive else 'top, left'}), got {checks.shown(value)}")
    pair = tuple(checks.integer(number, name) for number in value)
    if min(pair) < (1 if positive else 0):
        raise SettingError(f"{{{name}}} must be {'positive' if positive else '0 or more'}, got {checks.shown(value)}")
    return pair


def parse_pair(text: str, name: str) -> Size:
    """A command-line pair in diffusers' order, ``HEIGHT,WIDTH`` or ``TOP,LEFT``, as two integers; ``SdxlOptions`` checks them."""
    order = "TOP,LEFT, e.g. 0,0" if name.endswith("_top_left") else "HEIGHT,WIDTH (diffusers' order), e.g. 1024,1024"
    return checks.integers(text, 2, name, f"two integers {order}")  # type: ignore[return-value]


def check_refiner_switch(value) -> float:
    """A1111's "Switch at": the fraction of the steps the base runs before the refiner takes over, in (0, 1)."""
    number = checks.finite(value, "refiner_switch")
    if not 0 < number < 1:
        raise SettingError(f"{{refiner_switch}} must be between 0 and 1 (the base's share of the steps), got {checks.shown(value)}")
    return number
