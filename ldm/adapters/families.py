"""Which family of models (SD 1.x/2.x or SDXL) an adapter file was made for, checked against the model's.

SD 1.x/2.x and SDXL U-Nets name many modules alike (``down_blocks.1.attentions.0.…`` is in both), so a
LoRA for one may place on the other until a shape differs, or not at all. Before any module is
looked up, the file's modules are read for evidence of the family they were made for; a file whose
evidence all points to the other family than the model's is refused with one line naming both.
The evidence does not depend on the networks' widths except where the released models' widths are
unmistakable (a cross-attention's input, the text width: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL base,
1280 SDXL refiner):

- SDXL: a module of the second text encoder (``lora_te2_``, ``text_encoder_2.``); the U-Net's added
  conditioning (``add_embedding``, original ``label_emb``); a transformer block after the first of an
  attention (SD 1.x/2.x have one per attention); SDXL's cross-attention input width. (kohya writes
  ``lora_te1_`` for SDXL's first encoder, but a trainer may write it for SD 1.x's: it is no evidence.)
- SD 1.x/2.x: an attention in the U-Net's outermost level (``down_blocks.0.attentions``,
  ``up_blocks.3.attentions``; original ``input_blocks.1.1``, ``.2.1``, ``output_blocks.9-11.1``),
  which SDXL's U-Nets have not; SD's cross-attention input width.

A model is SDXL where it has a second text encoder or its U-Net has the added conditioning.
A file with evidence of both, or of neither, is left to the module lookup and its shape checks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Literal

from torch import nn

from ldm.errors import CheckpointError

Family = Literal["sd", "sdxl"]
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
# The released models' cross-attention input widths (the text encoders' output): unmistakable where found.
CONTEXT_WIDTHS: dict[int, tuple[Family, str]] = {
    768: ("sd", "SD 1.x's"), 1024: ("sd", "SD 2.x's"), 2048: ("sdxl", "SDXL's"), 1280: ("sdxl", "the SDXL refiner's"),
}  # fmt: skip
_OUTERMOST_ATTENTION = re.compile(r"(down_blocks_0_attentions|up_blocks_3_attentions|input_blocks_[12]_1|output_blocks_(9|10|11)_1)_")
_LATER_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks_([1-9]|\d\d+)_")
_ADDED_CONDITIONING = ("add_embedding_", "label_emb_")


def model_family(models: dict[str, nn.Module | None], unet_modules: Iterable[str]) -> Family:
    """``sdxl`` if the model has a second text encoder or its U-Net (``unet_modules``: its flat module names) the added
    conditioning."""
    if models.get("text_encoder_2") is not None or any(name.startswith(_ADDED_CONDITIONING) for name in unet_modules):
        return "sdxl"
    return "sd"


def evidence(part: str, flat: str, key: str, shape: tuple[int, ...]) -> tuple[Family, str] | None:
    """The family one module of a file points to, and why (completing "key K ..."); None if it fits both."""
    if part == "text_encoder_2":
        return "sdxl", "adapts SDXL's second text encoder (OpenCLIP bigG)"
    if part != "unet":
        return ("sd", "adapts a text encoder 1024 wide (SD 2.x's)") if shape[1:2] == (1024,) else None
    if flat.startswith(_ADDED_CONDITIONING):
        return "sdxl", "adapts the U-Net's added conditioning, which only SDXL has"
    if _LATER_TRANSFORMER_BLOCK.search(flat):
        return "sdxl", "adapts a second or later transformer block of an attention, which only SDXL has"
    if _OUTERMOST_ATTENTION.match(flat):
        return "sd", "adapts an attention of the U-Net's outermost level, which SDXL has not"
    if flat.endswith(("attn2_to_k", "attn2_to_v")) and len(shape) > 1 and shape[1] in CONTEXT_WIDTHS:
        family, whose = CONTEXT_WIDTHS[shape[1]]
        return family, f"has cross-attention inputs {shape[1]} wide ({whose})"
    return None


def check_family(
    path: str | os.PathLike, model: Family, modules: Iterable[tuple[str, str, str, tuple[int, ...]]]
) -> None:
    """Refuse the file at ``path`` if its ``modules`` ((part, flat name, a key, update shape) each) point only to the
    other family than ``model``: one line naming both families and a key that shows it."""
    found: dict[Family, tuple[str, str]] = {}
    for part, flat, key, shape in modules:
        seen = evidence(part, flat, key, shape)
        if seen is not None:
            found.setdefault(seen[0], (key, seen[1]))
    if len(found) == 1 and model not in found:
        (family, (key, why)), = found.items()
        raise mismatch(path, family, model, key, why)


def misplaced(path: str | os.PathLike, model: Family, part: str, flat: str, key: str, shape: tuple[int, ...]) -> CheckpointError | None:
    """For a module that does not place on the model (no such network or module, or another shape): the family error
    if the module itself points to the other family (in a file that also holds evidence of the model's)."""
    seen = evidence(part, flat, key, shape)
    return mismatch(path, seen[0], model, key, seen[1]) if seen is not None and seen[0] != model else None


def mismatch(path: str | os.PathLike, family: Family, model: Family, key: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: this LoRA is for {FAMILY_NAMES[family]}, the model is {FAMILY_NAMES[model]} (key {key!r} {why}); "
        f"use a LoRA made for {FAMILY_NAMES[model]}"
    )
