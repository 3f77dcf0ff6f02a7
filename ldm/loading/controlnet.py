"""ControlNet files and folders: read, detect, rename, load (``ldm.models.controlnet``).

Two layouts:

- a diffusers ``ControlNetModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, ``.bin``,
  sharded or the fp16 variant), or a pipeline folder with it in ``controlnet/``: diffusers' keys are ours;
- an original single file (lllyasviel's ``control_v11p_sd15_canny.pth``, ``.safetensors`` conversions of it,
  thibaud's SD 2.1 ones): the CompVis ``cldm.ControlNet`` keys, with or without the ``control_model.``
  prefix. Its encoder is named as the U-Net's (``time_embed``, ``input_blocks``, ``middle_block``: renamed
  by ``keymap.unet_original_key``) and it adds ``input_hint_block.N`` (the hint encoder's convolutions, every
  other module a SiLU), ``zero_convs.i.0`` (one 1x1 convolution per skip) and ``middle_block_out.0``.
  ``.pth`` / ``.ckpt`` / ``.pt`` files are read with ``torch.load(weights_only=True)``; ControlNet 1.0 files
  that bundle the SD 1.5 they were trained with (``model.diffusion_model.``, ``first_stage_model.``,
  ``cond_stage_model.``) are read for their ``control_model.`` tensors, the rest ignored. A diffusers-layout
  single file (a saved ``state_dict``) loads as it is.

A single file carries no configuration. Its shapes give the widths, levels, layers, projection kind, text
width and the hint encoder; the attention heads (and SD 2.1's fp32 attention) are the base U-Net's when
its widths match, else SD's conventions (8 heads for 1x1-conv projections, 64-wide heads for linear
ones, as ``ldm.loading.detect`` reads U-Nets). A ControlNet whose encoder does not fit the model's U-Net
(another text width, other block channels) is refused before its weights are read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.errors import CheckpointError, ConfigError
from ldm.loading.components import load_entries, shapes_of
from ldm.loading.configs import read_json
from ldm.loading.detect import sdxl_unet_fields
from ldm.loading.keymap import Entry, unet_original_key
from ldm.loading.sources import TensorFile, open_component
from ldm.models.controlnet import ControlNet, ControlNetConfig, describe_base, fits
from ldm.models.unet import UNetConfig

PREFIX = "control_model."
# Parts of a ControlNet 1.0 file that hold the SD model it was trained with (read and ignored).
BUNDLED_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
HINT_KEY = "input_hint_block.0.weight"  # the original layout's first hint convolution
DIFFUSERS_HINT_KEY = "controlnet_cond_embedding.conv_in.weight"


def load_controlnet(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, base: UNetConfig | None = None
) -> ControlNet:
    """The ControlNet of a diffusers folder or a single file, on ``device`` in ``dtype``, in eval mode.

    ``base``: the U-Net it will steer; a ControlNet made for another base is a ``ConfigError`` naming both.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ControlNet {path} does not exist; pass a .safetensors/.pth file or a diffusers ControlNet folder")
    if path.is_dir():
        folder = path / "controlnet" if (path / "controlnet" / "config.json").is_file() else path
        config = ControlNetConfig.from_diffusers(_folder_config(folder))
        check_base(config, base, path)
        source = open_component(folder, "diffusers")
        network = _build(config)
        entries = [Entry(key, (key,), "copy", shape) for key, shape in shapes_of(network).items()]
        load_entries(network, entries, source.shapes, source.read, device=torch.device(device), dtype=dtype, where=str(folder))
        return network.eval()
    return _load_file(path, torch.device(device), dtype, base)


def _folder_config(folder: Path) -> dict:
    config = read_json(folder / "config.json")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "ControlNetModel":
        raise CheckpointError(f"{folder} holds a {name or 'model without _class_name'}, not a diffusers ControlNetModel")
    return config


def is_controlnet_file(keys: set[str]) -> bool:
    """Whether a file's keys are a ControlNet's (either layout, with or without the ``control_model.`` prefix)."""
    return bool({HINT_KEY, PREFIX + HINT_KEY, DIFFUSERS_HINT_KEY} & keys)


def file_prefix_and_shapes(source: TensorFile, path: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The file's ControlNet key prefix (``control_model.`` or none) and its shapes without it."""
    prefix = PREFIX if any(key.startswith(PREFIX) for key in source.shapes) else ""
    shapes = {key[len(prefix) :]: shape for key, shape in source.shapes.items() if key.startswith(prefix)}
    if prefix:
        others = [key for key in source.shapes if not key.startswith((PREFIX, *BUNDLED_PREFIXES))]
        if others:
            raise CheckpointError(f"{path} has keys outside {PREFIX}* that no ControlNet file holds ({', '.join(sorted(others)[:3])})")
    return prefix, shapes


def file_config(shapes: Mapping[str, tuple[int, ...]], path: Path, base: UNetConfig | None = None) -> ControlNetConfig:
    """The configuration of a single file's ControlNet (prefix removed), in either layout, from its shapes."""
    if DIFFUSERS_HINT_KEY in shapes:  # a diffusers-layout state dict saved as one file
        raise_unless_encoder(shapes, path, "conv_in.weight")
        return config_from_shapes(_as_original(shapes), base)
    raise_unless_controlnet(shapes, path)
    return config_from_shapes(shapes, base)


def _load_file(path: Path, device: torch.device, dtype: torch.dtype, base: UNetConfig | None) -> ControlNet:
    source = TensorFile(path)
    prefix, shapes = file_prefix_and_shapes(source, path)
    config = file_config(shapes, path, base)
    check_base(config, base, path)
    network = _build(config)
    own = shapes_of(network)
    if DIFFUSERS_HINT_KEY in shapes:
        entries = [Entry(prefix + key, (key,), "copy", shape) for key, shape in own.items()]
    else:
        entries = original_entries(own, prefix)
    file_shapes = {key: shape for key, shape in source.shapes.items() if key.startswith(prefix) and not key.startswith(BUNDLED_PREFIXES)}
    load_entries(network, entries, file_shapes, source.read, device=device, dtype=dtype, where=str(path))
    return network.eval()


def _build(config: ControlNetConfig) -> ControlNet:
    with torch.device("meta"):
        return ControlNet(config)


def check_base(config: ControlNetConfig, base: UNetConfig | None, path: Path) -> None:
    if base is not None and not fits(config, base):
        raise ConfigError(
            f"ControlNet {path.name} was made for a U-Net with {describe_base(config.unet)}, but this model's U-Net has "
            f"{describe_base(base)}; use a ControlNet made for this model's base (SD 1.x, 2.x or SDXL)"
        )


def raise_unless_controlnet(shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """A one-line error unless the (prefix-free) keys are an original ControlNet's."""
    if HINT_KEY not in shapes:
        if any(key.startswith("model.diffusion_model.") for key in shapes):
            raise CheckpointError(f"{path} is a Stable Diffusion model, not a ControlNet; pass it as the model")
        raise CheckpointError(
            f"{path} is not a ControlNet (no input_hint_block or controlnet_cond_embedding keys); "
            "ldm reads ControlNet .safetensors/.pth files and diffusers ControlNet folders"
        )
    raise_unless_encoder(shapes, path, "input_blocks.0.0.weight")


def raise_unless_encoder(shapes: Mapping[str, tuple[int, ...]], path: Path, key: str) -> None:
    if key not in shapes:
        raise CheckpointError(f"{path} has a hint encoder but no U-Net encoder ({key}); it is not a whole ControlNet")


# --- configuration from shapes ----------------------------------------------------------------------


def _indices(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> list[int]:
    return sorted({int(m[1]) for key in shapes if (m := re.fullmatch(pattern, key))})


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"the ControlNet has no {key}; its layout is not one ldm knows")
    return shapes[key]


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], base: UNetConfig | None = None) -> ControlNetConfig:
    """The configuration of an original-layout ControlNet (prefix removed), read from its shapes."""
    downsamplers = _indices(shapes, r"input_blocks\.(\d+)\.0\.op\.weight")
    blocks = _indices(shapes, r"input_blocks\.(\d+)\..*")
    step = downsamplers[0] if downsamplers else len(blocks)  # layers per level + 1 (one level: all blocks but conv_in)
    if len(blocks) % step:
        raise CheckpointError(f"unknown ControlNet layout: {len(blocks)} input blocks is not a multiple of {step}")
    levels = len(blocks) // step
    widths = tuple(_shape(shapes, f"input_blocks.{1 + i * step}.0.in_layers.2.weight")[0] for i in range(levels))
    cross = tuple(f"input_blocks.{1 + i * step}.1.proj_in.weight" in shapes for i in range(levels))
    linear = len(_shape(shapes, "middle_block.1.proj_in.weight")) == 2
    context = _shape(shapes, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    sdxl = "label_emb.0.0.weight" in shapes  # SDXL's added conditioning (pooled text, micro-conditioning)
    unet = UNetConfig(
        in_channels=_shape(shapes, "input_blocks.0.0.weight")[1], block_out_channels=widths, layers_per_block=step - 1,
        cross_attention_levels=cross, num_attention_heads=_heads(widths, linear, base), cross_attention_dim=context,
        use_linear_projection=linear, upcast_attention=base.upcast_attention if base is not None else linear and not sdxl,
        **(_sdxl_fields(shapes, cross, step, base) if sdxl else {}),
    )  # fmt: skip
    hint = _indices(shapes, r"input_hint_block\.(\d+)\.weight")
    if len(hint) < 2 or len(hint) % 2:
        raise CheckpointError(f"unknown ControlNet hint encoder: {len(hint)} convolutions (input_hint_block.N)")
    first = _shape(shapes, f"input_hint_block.{hint[0]}.weight")
    strided = hint[2:-1:2]  # conv_in, then (conv, strided conv) per width step, then conv_out
    widths_in = (first[0], *(shapes[f"input_hint_block.{i}.weight"][0] for i in strided))
    return ControlNetConfig(unet=unet, conditioning_channels=first[1], conditioning_embedding_out_channels=widths_in)


def _sdxl_fields(
    shapes: Mapping[str, tuple[int, ...]], cross: tuple[bool, ...], step: int, base: UNetConfig | None
) -> dict[str, Any]:
    """An SDXL ControlNet's transformer depths and added conditioning, read as an SDXL U-Net's are
    (``detect.sdxl_unet_fields``); the sinusoid width per number is the base's where it has one (a file does not
    record it)."""
    fields = sdxl_unet_fields(shapes, cross, step, p="")
    fields["transformer_layers_per_block"] = tuple(fields["transformer_layers_per_block"])
    if base is not None and base.addition_time_embed_dim:
        fields["addition_time_embed_dim"] = base.addition_time_embed_dim
    return fields


def _heads(widths: tuple[int, ...], linear: bool, base: UNetConfig | None) -> tuple[int, ...]:
    """The base U-Net's heads where the widths match it, else SD 1.x's 8 per level or SD 2.x's 64-wide heads."""
    if base is not None and base.block_out_channels == widths:
        return base.num_attention_heads
    if linear and all(width % 64 == 0 for width in widths):
        return tuple(width // 64 for width in widths)
    return (8,) * len(widths)


# --- the key map ------------------------------------------------------------------------------------


def original_key(key: str, hint_blocks: int) -> str:
    """The original (cldm) key of one of the keys a ControlNet adds to the U-Net encoder's (``OWN_PARTS``)."""
    head, _, tail = key.rpartition(".")
    if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))", head):
        index = 0 if m[1] == "conv_in" else 2 * (hint_blocks + 1) if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
        return f"input_hint_block.{index}.{tail}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", head):
        return f"zero_convs.{m[1]}.0.{tail}"
    if head == "controlnet_mid_block":
        return f"middle_block_out.0.{tail}"
    raise KeyError(f"no original name for ControlNet key {key}")


OWN_PARTS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def original_entries(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> list[Entry]:
    """Key map of our ControlNet (its own keys and shapes) to the original single-file layout behind ``prefix``."""
    hint_blocks = len(_indices(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight"))
    layers = 1 + max(int(key.split(".")[3]) for key in shapes if key.startswith("down_blocks.0.resnets."))
    entries = []
    for key, shape in shapes.items():
        if key.startswith(OWN_PARTS):
            original = original_key(key, hint_blocks)
        else:
            original = unet_original_key(key, layers, frozenset())
        entries.append(Entry(prefix + original, (key,), "copy", tuple(shape)))
    return entries


def _as_original(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A diffusers-layout file's shapes under the original names, for ``config_from_shapes``."""
    layers = 1 + max(int(key.split(".")[3]) for key in shapes if key.startswith("down_blocks.0.resnets."))
    hint_blocks = len(_indices(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight"))
    renamed = {}
    for key, shape in shapes.items():
        try:
            renamed[original_key(key, hint_blocks) if key.startswith(OWN_PARTS) else unet_original_key(key, layers, frozenset())] = shape
        except KeyError:
            raise CheckpointError(f"unknown ControlNet key {key}; its layout is not one ldm knows") from None
    return renamed
