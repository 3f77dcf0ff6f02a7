"""The checks of a generation's settings: one function per setting, used by ``ldm.settings``.

Each function checks one setting and raises ``SettingError`` with a one-line message that names
the setting as a ``{name}`` placeholder, so each way in words it its own way: ``guidance_scale``
in Python, ``--guidance-scale`` on the command line. Numbers must be finite: a NaN guidance scale would silently make an unguided image, an
infinite one would run every step and then fail. Nothing here imports torch, so the command line
refuses a bad argument in milliseconds, before the seconds that importing torch takes.
"""

from __future__ import annotations

import math
import operator

from ldm.errors import SettingError, placeholder_text

# Pixels per batch (width x height x images generated together): 1024x1024 x 4, 512x512 x 16.
# It stops a mistyped size or batch before it allocates tens of GB; raise it for big GPUs.
MAX_PIXELS = 4 * 1024 * 1024
# More steps than the training schedule's timesteps (1000 for every SD model) only repeat timesteps.
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
RANDOM_SEED = -1  # the seed that asks for a random one
MAX_TOKEN_MERGING = 0.75  # = ldm.speedups.tome.MAX_RATIO (a test keeps them equal; that module imports torch)


def shown(value) -> str:
    """``value`` as a message shows it: text quoted, braces doubled (the message is a template)."""
    return placeholder_text(repr(value) if isinstance(value, (str, bytes)) else str(value))


def finite(value, name: str) -> float:
    """``value`` as a float; ``SettingError`` unless it is a finite number (text is not a number here:
    the command line parses its flags, and a Python caller passing "7.5" has made a mistake)."""
    if isinstance(value, (str, bytes, bool)):
        raise SettingError(f"{{{name}}} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{{{name}}} must be a number, got {shown(value)}") from None
    if not math.isfinite(number):
        raise SettingError(f"{{{name}}} must be a finite number, got {shown(value)}")
    return number


def integer(value, name: str) -> int:
    """``value`` as an int; ``SettingError`` unless it is an integer (a bool is not)."""
    if isinstance(value, bool):
        raise SettingError(f"{{{name}}} must be an integer, got {shown(value)}")
    try:
        return operator.index(value)
    except TypeError:
        raise SettingError(f"{{{name}}} must be an integer, got {shown(value)}") from None


def integers(text: str, count: int, name: str, expected: str) -> tuple[int, ...]:
    """A command-line list of ``count`` comma-separated integers; ``SettingError`` saying ``expected`` (what the
    flag takes, e.g. "two integers HEIGHT,WIDTH") otherwise."""
    parts = [part.strip() for part in text.split(",")]
    try:
        if len(parts) != count:
            raise ValueError
        return tuple(int(part) for part in parts)
    except ValueError:
        raise SettingError(f"{{{name}}} takes {expected}; got {shown(text)}") from None


def _between(value, name: str, low: float, high: float, meaning: str = "") -> float:
    number = finite(value, name)
    if not low <= number <= high:
        raise SettingError(f"{{{name}}} must be in [{low:g}, {high:g}]{meaning}, got {shown(value)}")
    return number


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """Any finite weight; <= 1 turns guidance off."""
    return finite(value, name)


def check_guidance_rescale(value, name: str = "guidance_rescale") -> float:
    return _between(value, name, 0.0, 1.0)


def check_eta(value, name: str = "eta") -> float:
    """DDIM's eta: 0 is deterministic, 1 the DDPM variance; more adds more noise."""
    number = finite(value, name)
    if number < 0:
        raise SettingError(f"{{{name}}} must be 0 or more (0 = deterministic), got {shown(value)}")
    return number


def check_strength(value, name: str = "strength") -> float:
    number = finite(value, name)
    if not 0 < number <= 1:
        raise SettingError(f"{{{name}}} must be in (0, 1], got {shown(value)}")
    return number


def check_subseed_strength(value, name: str = "subseed_strength") -> float:
    return _between(value, name, 0.0, 1.0, " (0 = off, 1 = the variation seed's noise)")


def check_guidance_fraction(value, name: str = "guidance_fraction") -> float:
    return _between(value, name, 0.0, 1.0, " (1 = guidance at every step)")


def check_token_merging(value, name: str = "token_merging") -> float:
    return _between(value, name, 0.0, MAX_TOKEN_MERGING, " (0 = off)")


def check_deepcache_interval(value, name: str = "deepcache_interval") -> int:
    number = integer(value, name)
    if number < 1:
        raise SettingError(f"{{{name}}} must be at least 1 (1 = off), got {shown(value)}")
    return number


def check_count(value, name: str) -> int:
    """An image count or batch size: an integer of at least 1."""
    number = integer(value, name)
    if number < 1:
        raise SettingError(f"{{{name}}} must be at least 1, got {shown(value)}")
    return number


def check_steps(value, name: str = "num_inference_steps", limit: int = MAX_STEPS) -> int:
    """1 to ``limit`` steps: the model's training timesteps, or ``MAX_STEPS`` before it is loaded."""
    number = integer(value, name)
    if not 1 <= number <= limit:
        raise SettingError(f"{{{name}}} must be from 1 to {limit} (the model's training timesteps), got {shown(value)}")
    return number


def check_clip_skip(value, name: str = "clip_skip") -> int:
    number = integer(value, name)
    if number < 0:
        raise SettingError(f"{{{name}}} must be 0 or more, got {shown(value)}")
    return number


def check_side(value, name: str, factor: int = 8) -> int:
    """A width or height: a positive multiple of the VAE's factor."""
    number = integer(value, name)
    if number <= 0 or number % factor:
        raise SettingError(f"{{{name}}} must be a positive multiple of {factor}, got {shown(value)}")
    return number


def check_max_pixels(value, name: str = "max_pixels") -> int:
    number = integer(value, name)
    if number < 1:
        raise SettingError(f"{{{name}}} must be a positive number of pixels, got {shown(value)}")
    return number


def check_seed(value, count: int, name: str = "seed") -> int:
    """A first seed for ``count`` consecutive images: -1 (random) or one whose last image's seed fits."""
    number = integer(value, name)
    last = MAX_SEED - count + 1
    if number != RANDOM_SEED and not 0 <= number <= last:
        raise SettingError(f"{{{name}}} must be -1 (random) or from 0 to {last} for {count} images, got {number}")
    return number


def check_pixels(width: int, height: int, batch: int, max_pixels: int, limit_name: str = "max_pixels") -> None:
    """Refuse a batch of more than ``max_pixels`` pixels before anything is allocated for it."""
    pixels = width * height * batch
    if pixels > max_pixels:
        raise SettingError(
            f"{width}x{height} x {batch} images = {pixels} pixels per batch is over {{{limit_name}}} = {max_pixels}; "
            f"make the images smaller or fewer at a time, or raise {{{limit_name}}}"
        )
