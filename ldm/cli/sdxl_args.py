"""The SDXL micro-conditioning flags of ``ldm txt2img``: ``ldm.sdxl.SdxlOptions``, named after diffusers' arguments.

    --original-size 2048,2048 --crops-coords-top-left 0,0 --negative-original-size 256,256 --negative-target-size 1024,1024

Sizes are ``HEIGHT,WIDTH`` and crops ``TOP,LEFT``: diffusers' tuples in diffusers' order, comma-separated as
``--outpaint`` takes its list (no ``x`` form: "2048x1536" reads as A1111's width x height). Unset flags keep
diffusers' defaults (``SdxlOptions``). On an SD 1.x/2.x model any of them is a one-line error naming the flag
(``ldm.pipeline.sdxl.check``). Nothing here imports torch.
"""

from __future__ import annotations

import argparse

from ldm.sdxl import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, SdxlOptions, parse_pair

# Each pair flag's SdxlOptions field and its help.
PAIRS = {
    "original_size": "the training image's size before resizing, as SDXL is told it (default: the output size)",
    "crops_coords_top_left": "where that image was cropped (default 0,0; larger values tend to crop the subject)",
    "target_size": "the size the base is told to make (default: the output size; the refiner reads the aesthetic score)",
    "negative_original_size": "the unconditional rows' original size (e.g. 512,512 steers away from low-resolution "
    "images; the base reads the negative sizes only when both are given)",
    "negative_crops_coords_top_left": "the unconditional rows' crop (default 0,0)",
    "negative_target_size": "the unconditional rows' target size (with --negative-original-size)",
}  # fmt: skip
SCORES = {
    "aesthetic_score": f"the refiner's aesthetic score for the prompt (default {AESTHETIC_SCORE:g}; with --refiner or a refiner model)",
    "negative_aesthetic_score": f"its score for the negative prompt (default {NEGATIVE_AESTHETIC_SCORE:g})",
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The micro-conditioning flags, in the txt2img parser's SDXL group."""
    for name, text in PAIRS.items():
        metavar = "TOP,LEFT" if name.endswith("_top_left") else "HEIGHT,WIDTH"  # diffusers' order
        group.add_argument("--" + name.replace("_", "-"), metavar=metavar, help=text)
    for name, text in SCORES.items():
        group.add_argument("--" + name.replace("_", "-"), type=float, metavar="S", help=text)


def sdxl_options(args: argparse.Namespace) -> SdxlOptions | None:
    """The ``SdxlOptions`` the flags give, checked (a ``SettingError`` names the flag); None when none is given."""
    given = {name: parse_pair(getattr(args, name), name) for name in PAIRS if getattr(args, name) is not None}
    given.update({name: getattr(args, name) for name in SCORES if getattr(args, name) is not None})
    return SdxlOptions(**given) if given else None
