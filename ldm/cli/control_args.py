"""The ControlNet flags of ``ldm txt2img``: each ``--controlnet FILE`` starts a unit, and the ``--control-*``
flags after it (before the next ``--controlnet``) set that unit's image and options.

    --controlnet canny.safetensors --control-image edges.png --control-scale 0.8 \\
    --controlnet depth.pth --control-image depth.png --control-start 0.1

A ``--control-*`` flag before the first ``--controlnet``, one given twice for a unit, or a unit without
``--control-image`` is a one-line error. Nothing here imports torch; the units are ``ldm.control.ControlUnit``s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.control import CANNY_THRESHOLDS, ControlUnit
from ldm.errors import InputError, SettingError

# Each unit flag's ControlUnit field, and how its text becomes the value.
UNIT_FLAGS = {
    "--control-image": ("image", Path),
    "--control-preprocess": ("preprocess", str),
    "--control-scale": ("scale", float),
    "--control-start": ("start", float),
    "--control-end": ("end", float),
    "--control-mode": ("mode", str),
    "--control-guess-mode": ("mode", str),
    "--control-resize": ("resize_mode", str),
    "--control-thresholds": ("thresholds", str),
}
# The flag of each ControlUnit field, as a SettingError names it.
FLAGS = {
    "control": "--controlnet", "control.model": "--controlnet", "control.image": "--control-image",
    "control.preprocess": "--control-preprocess", "control.scale": "--control-scale", "control.start": "--control-start",
    "control.end": "--control-end", "control.mode": "--control-mode", "control.resize_mode": "--control-resize",
    "control.thresholds": "--control-thresholds",
}  # fmt: skip


class _InOrder(argparse.Action):
    """Keeps every ControlNet flag with its value, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = list(getattr(namespace, "control_flags", None) or [])
        given.append((option_string, "controlnet" if option_string == "--control-guess-mode" else values))
        namespace.control_flags = given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "ControlNet (docs/controlnet.md; each --controlnet starts a unit that the --control-* flags after it set up)"
    )
    group.add_argument("--controlnet", action=_InOrder, metavar="FILE", help="a ControlNet .safetensors/.pth file or diffusers folder (repeatable)")
    group.add_argument("--control-image", action=_InOrder, metavar="IMG", help="the unit's image (its control map with --control-preprocess none)")
    group.add_argument("--control-preprocess", action=_InOrder, choices=("none", "canny"), help="make the control map from the image (default none)")
    group.add_argument("--control-scale", action=_InOrder, metavar="S", help="residual weight, 0 to 2 (default 1)")
    group.add_argument("--control-start", action=_InOrder, metavar="F", help="the fraction of the steps before the unit acts (default 0)")
    group.add_argument("--control-end", action=_InOrder, metavar="F", help="the fraction of the steps after which it stops (default 1)")
    group.add_argument(
        "--control-mode", action=_InOrder, choices=("balanced", "prompt", "controlnet"),
        help="A1111's control mode: balanced (default), prompt (my prompt is more important), controlnet (ControlNet is more important)",
    )  # fmt: skip
    group.add_argument("--control-guess-mode", action=_InOrder, nargs=0, help="diffusers' guess mode: short for --control-mode controlnet")
    group.add_argument(
        "--control-resize", action=_InOrder, choices=("resize", "crop", "fill"),
        help="image to output size: stretch (default), crop to cover, or fit and fill",
    )  # fmt: skip
    group.add_argument(
        "--control-thresholds", action=_InOrder, metavar="LOW,HIGH",
        help=f"canny's thresholds (default {CANNY_THRESHOLDS[0]},{CANNY_THRESHOLDS[1]})",
    )  # fmt: skip


def control_units(args: argparse.Namespace) -> tuple[ControlUnit, ...]:
    """The units the flags describe, each checked; an error names the unit by its number."""
    units: list[dict] = []
    for flag, value in getattr(args, "control_flags", None) or []:
        if flag == "--controlnet":
            units.append({"model": Path(value)})
            continue
        if not units:
            raise InputError(f"{flag} comes before any --controlnet; each --controlnet FILE starts a unit that the flags after it set")
        field, parse = UNIT_FLAGS[flag]
        if field in units[-1]:
            raise InputError(f"ControlNet unit {len(units)} has {flag} (or its alias) twice; give each unit's options once")
        units[-1][field] = _parsed(flag, value, parse)
    return tuple(_unit(i, fields) for i, fields in enumerate(units, start=1))


def _parsed(flag: str, value: str, parse):
    try:
        if flag == "--control-thresholds":
            low, high = value.split(",")
            return int(low), int(high)
        return parse(value)
    except ValueError:
        raise InputError(f"{flag} {value!r} is not valid; see ldm txt2img --help") from None


def _unit(number: int, fields: dict) -> ControlUnit:
    if "image" not in fields:
        raise InputError(f"ControlNet unit {number} ({fields['model']}) has no --control-image; give one after its --controlnet")
    if not fields["model"].exists():
        raise InputError(f"--controlnet {fields['model']} does not exist; pass a .safetensors/.pth file or a diffusers ControlNet folder")
    try:
        return ControlUnit(**fields)
    except SettingError as error:
        raise SettingError(f"ControlNet unit {number}: {error.template}") from None
