"""Every rename between the diffusers layout and the original single-file layout.

The networks in ``ldm.models`` use diffusers' state_dict keys, so a diffusers
folder loads without renaming. The original CompVis / Stability checkpoints
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``)
name the same tensors differently; this module is the only place that knows
how. A key map is built from the model's own (diffusers) keys and shapes, so
every tensor the model needs has exactly one entry, with the original key, the
original shape and the transform between the two:

- ``copy``: same tensor, same shape.
- ``conv1x1``: the VAE attention projections are 1x1 convolutions in the
  original ``[C, C, 1, 1]`` and linear layers in diffusers ``[C, C]``; a reshape
  (a view, no copy).
- ``qkv``: OpenCLIP (SD 2.x, SDXL's bigG) stores one ``in_proj`` holding q, k and v
  stacked along dim 0; diffusers/transformers split it into ``q_proj``, ``k_proj``,
  ``v_proj``.
- ``transpose``: OpenCLIP's ``text_projection`` is applied as ``x @ P`` (width x
  projection width); transformers' ``text_projection`` is a ``Linear`` whose weight
  is ``P`` transposed.

SDXL files keep the same U-Net and VAE names (plus ``label_emb``, the added
conditioning's MLP) and put their text encoders under ``conditioner.embedders.N.``:
CLIP ViT-L in transformers' names (``.transformer.text_model.``) and OpenCLIP bigG in
OpenCLIP's (``.model.``); the refiner has bigG alone, as embedder 0 (``TEXT_SLOTS``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ldm.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
# Early SD 1.x files (and some merges) omit "text_model."; readers normalize it to the form above.
SD1_TEXT_LEGACY_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."
SDXL_CONDITIONER_PREFIX = "conditioner.embedders."

Transform = Literal["copy", "conv1x1", "qkv", "transpose"]


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder of a family lives in a single file, and in whose names."""

    prefix: str  # the file's prefix of this encoder's keys
    layout: Literal["clip", "openclip"]  # transformers' CLIP names, or OpenCLIP's (fused in_proj, ln_final, ...)
    # The network has a text projection (transformers' CLIPTextModelWithProjection: SDXL's pooled text). Without
    # one, an OpenCLIP file's text_projection and its last block are tensors SD never runs (SD 2.x).
    projected: bool = False


# Each family's text encoders in diffusers' slots (text_encoder, text_encoder_2); None: no encoder there.
TEXT_SLOTS: dict[str, tuple[TextSlot | None, TextSlot | None]] = {
    "sd1": (TextSlot(SD1_TEXT_PREFIX, "clip"), None),
    "sd2": (TextSlot(SD2_TEXT_PREFIX, "openclip"), None),
    "sdxl": (TextSlot(SDXL_CLIP_L_PREFIX, "clip"), TextSlot(SDXL_BIGG_PREFIX, "openclip", projected=True)),
    "sdxl-refiner": (None, TextSlot(SDXL_REFINER_BIGG_PREFIX, "openclip", projected=True)),
}


def text_slot(family: str, slot: int) -> TextSlot:
    """Where text encoder ``slot`` (0: ``text_encoder``, 1: ``text_encoder_2``) of ``family`` lives in a single file."""
    found = TEXT_SLOTS[family][slot]
    if found is None:
        raise KeyError(f"the {family} family has no text encoder in slot {slot}")
    return found

# The original TAESD decoder's sequence begins with a clamp (no weights): its indices are diffusers' + 1.
TAESD_DECODER_OFFSET = 1


@dataclass(frozen=True)
class Entry:
    """One tensor of the original file and the diffusers tensor(s) it holds."""

    original: str
    diffusers: tuple[str, ...]
    transform: Transform
    original_shape: tuple[int, ...]


# ---------------------------------------------------------------------------
# Renaming rules, diffusers key -> original key (without the component prefix)
# ---------------------------------------------------------------------------

# ResBlock parameter names: diffusers ResnetBlock2D -> openaimodel.ResBlock.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    # A guidance-distilled (LCM) U-Net's condition projection. The CompVis code has none, so ldm names it
    # beside the time embedding; such a file needs its config in its metadata (ldm.loading.configs).
    "time_embedding.cond_proj": "time_embed.cond_proj",
    # SDXL's added conditioning (pooled text and micro-conditioning numbers) -> time embedding width.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_original_key(key: str, layers_per_block: int, up_levels_with_attention: frozenset[int]) -> str:
    """The openaimodel.UNetModel key of a diffusers UNet2DConditionModel key.

    Down level i holds ``layers_per_block`` (resnet, attention) pairs in
    ``input_blocks`` and a downsampler (except the deepest level); up level i
    holds ``layers_per_block + 1`` pairs in ``output_blocks`` and an upsampler
    appended to the last pair (except the last level).
    """
    step = layers_per_block + 1
    head, _, tail = key.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = 1 + int(m[1]) * step + int(m[3])
        if m[2] == "resnets":
            return f"input_blocks.{index}.0.{_resnet(m[4], _UNET_RESNET)}"
        return f"input_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = int(m[1]) * step + int(m[3])
        if m[2] == "resnets":
            return f"output_blocks.{index}.0.{_resnet(m[4], _UNET_RESNET)}"
        return f"output_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if level in up_levels_with_attention else 1
        return f"output_blocks.{level * step + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original name for U-Net key {key}")


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_FIXED = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}


def vae_original_key(key: str, num_levels: int) -> str:
    """The taming/CompVis AutoencoderKL key of a diffusers AutoencoderKL key.

    The original decoder numbers its levels from the lowest resolution up in
    reverse (``up.{n-1}`` runs first), diffusers in execution order.
    """
    head, _, tail = key.rpartition(".")
    if head in _VAE_FIXED:
        return f"{_VAE_FIXED[head]}.{tail}"
    resnet = {"conv_shortcut": "nin_shortcut"}
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], resnet)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], resnet)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], resnet)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    return key


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPENCLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",  # CLIPTextModelWithProjection's (SDXL), transposed
}


def openclip_original_key(key: str) -> str:
    """The OpenCLIP text-tower key of a transformers CLIPTextModel(WithProjection) state_dict key.

    transformers 5 names CLIPTextModel's keys without the ``text_model.`` prefix that the
    released diffusers folders carry, CLIPTextModelWithProjection's with it; keys here have none.
    """
    if key in _OPENCLIP_FIXED:
        return _OPENCLIP_FIXED[key]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise KeyError(f"no original name for text encoder key {key}")
    if m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
    return f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"


# ---------------------------------------------------------------------------
# Key maps built from a model's own keys and shapes
# ---------------------------------------------------------------------------


def _build(shapes: Mapping[str, tuple[int, ...]], prefix: str, rename: Callable[[str], str]) -> list[Entry]:
    groups: dict[str, list[str]] = {}
    for key in shapes:
        groups.setdefault(prefix + rename(key), []).append(key)
    entries = []
    for original, keys in groups.items():
        first = tuple(shapes[keys[0]])
        if len(keys) == 3 and original.endswith(("in_proj_weight", "in_proj_bias")):
            order = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
            keys.sort(key=lambda k: order[k.rsplit(".", 2)[-2]])
            entries.append(Entry(original, tuple(keys), "qkv", (3 * first[0], *first[1:])))
        elif ".mid.attn_1." in original and original.endswith("weight") and len(first) == 2:
            entries.append(Entry(original, tuple(keys), "conv1x1", (*first, 1, 1)))
        elif original.endswith(".text_projection") and len(first) == 2:
            entries.append(Entry(original, tuple(keys), "transpose", first[::-1]))
        else:
            assert len(keys) == 1, f"keys {keys} share the original name {original}"
            entries.append(Entry(original, tuple(keys), "copy", first))
    return entries


def unet_entries(shapes: Mapping[str, tuple[int, ...]]) -> list[Entry]:
    """Key map of a diffusers-layout U-Net, given its state_dict shapes."""
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("down_blocks.0.resnets."))
    up_attention = frozenset(int(k.split(".")[1]) for k in shapes if re.match(r"up_blocks\.\d+\.attentions\.", k))
    return _build(shapes, UNET_PREFIX, lambda k: unet_original_key(k, layers, up_attention))


def vae_entries(shapes: Mapping[str, tuple[int, ...]]) -> list[Entry]:
    """Key map of a diffusers-layout AutoencoderKL, given its state_dict shapes."""
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up_blocks."))
    return _build(shapes, VAE_PREFIX, lambda k: vae_original_key(k, levels))


def taesd_entries(shapes: Mapping[str, tuple[int, ...]], part: Literal["encoder", "decoder"]) -> list[Entry]:
    """Key map of TAESD's encoder or decoder (its own keys, ``layers.N...``) to the original standalone
    ``taesd_encoder`` / ``taesd_decoder`` file, whose sequence is the module itself (``N...``). The
    original decoder starts with its clamp, a layer without weights that diffusers folds into
    ``forward``, so its indices are one higher."""
    offset = TAESD_DECODER_OFFSET if part == "decoder" else 0

    def rename(key: str) -> str:
        index, _, rest = key.removeprefix("layers.").partition(".")
        return f"{int(index) + offset}.{rest}"

    return _build(shapes, "", rename)


def text_entries(shapes: Mapping[str, tuple[int, ...]], family: str, slot: int = 0) -> list[Entry]:
    """Key map of text encoder ``slot`` of ``family`` (``TEXT_SLOTS``): a transformers CLIPTextModel or
    CLIPTextModelWithProjection, named in the file as transformers names CLIP or as OpenCLIP does.

    ``shapes`` uses the model's own keys (``text_model.`` is dropped where it has it).
    """
    place = text_slot(family, slot)
    if place.layout == "clip":
        return _build(shapes, place.prefix, lambda k: k.removeprefix(TEXT_MODEL_PREFIX))
    return _build(shapes, place.prefix, lambda k: openclip_original_key(k.removeprefix(TEXT_MODEL_PREFIX)))


# ---------------------------------------------------------------------------
# Keys outside the networks' own: legacy spellings and tensors SD never runs
# ---------------------------------------------------------------------------

# transformers < 5 (and every released diffusers folder) prefix the text encoder's keys with this.
TEXT_MODEL_PREFIX = "text_model."
# Buffers that older files store and the networks recompute: accepted on read, never used.
TEXT_POSITION_IDS = "embeddings.position_ids"


def normalize_single_file_key(key: str) -> str:
    """Early SD 1.x files (and some merges) omit ``text_model.`` in the text encoder's keys."""
    if key.startswith(SD1_TEXT_LEGACY_PREFIX) and not key.startswith(SD1_TEXT_PREFIX):
        return SD1_TEXT_PREFIX + key[len(SD1_TEXT_LEGACY_PREFIX) :]
    return key


def normalize_text_encoder_key(key: str) -> str:
    """A diffusers folder's text encoder key in transformers 5 naming (no ``text_model.``)."""
    return key.removeprefix(TEXT_MODEL_PREFIX)


def unused_text_keys(family: str, text_shapes: Mapping[str, tuple[int, ...]], blocks_in_file: int, slot: int = 0) -> dict:
    """Original keys of text-encoder tensors SD does not run -> expected shape (None: any).

    CLIP names: the ``position_ids`` buffer. OpenCLIP: ``logit_scale`` (a scalar) and the blocks past
    the ones used; without a projection in the network (SD 2 conditions on the penultimate block)
    also ``text_projection`` (width x projection width, any projection width).
    """
    place = text_slot(family, slot)
    own = {key.removeprefix(TEXT_MODEL_PREFIX): shape for key, shape in text_shapes.items()}
    if place.layout == "clip":
        return {place.prefix + "embeddings.position_ids": (1, own["embeddings.position_embedding.weight"][0])}
    unused: dict[str, tuple[int, ...] | None] = {place.prefix + "logit_scale": ()}
    if not place.projected:
        unused[place.prefix + "text_projection"] = None
    layers = 1 + max(int(k.split(".")[2]) for k in own if k.startswith("encoder.layers."))
    for entry in text_entries(text_shapes, family, slot):
        if m := re.fullmatch(r"(.*transformer\.resblocks\.)0\.(.+)", entry.original):
            for block in range(layers, blocks_in_file):
                unused[f"{m[1]}{block}.{m[2]}"] = entry.original_shape
    return unused


def unused_text_tensors(
    family: str, state: Mapping[str, torch.Tensor], layers: int, width: int, positions: int, slot: int = 0
) -> dict:
    """Values written for the tensors of ``unused_text_keys``, so a file has the released layout.

    CLIP names: ``position_ids`` 0..positions-1. OpenCLIP: ``logit_scale = log(100)`` (CLIP's trained
    value, clamped at 100); without a projection in the network (SD 2.x) also one more block of zeros
    (an identity residual block: every projection and norm outputs 0) and an identity
    ``text_projection``. They are never run.
    """
    place = text_slot(family, slot)
    if place.layout == "clip":
        return {place.prefix + "embeddings.position_ids": torch.arange(positions, dtype=torch.int64).unsqueeze(0)}
    like = state[place.prefix + "ln_final.weight"]
    unused = {place.prefix + "logit_scale": torch.tensor(math.log(100.0), dtype=like.dtype, device=like.device)}
    if place.projected:
        return unused
    last = f"{place.prefix}transformer.resblocks.{layers - 1}."
    unused.update(
        {
            f"{place.prefix}transformer.resblocks.{layers}.{key[len(last):]}": torch.zeros_like(value)
            for key, value in state.items()
            if key.startswith(last)
        }
    )
    unused[place.prefix + "text_projection"] = torch.eye(width, dtype=like.dtype, device=like.device)
    return unused


# ---------------------------------------------------------------------------
# Which VAE layout a file's keys are in
# ---------------------------------------------------------------------------

VaeLayout = Literal["kl", "kl-diffusers", "taesd-encoder", "taesd-decoder"]

# A key every KL-VAE has, in the original layout (possibly behind VAE_PREFIX) and in diffusers'.
_KL_KEY = "encoder.down.0.block.0.conv1.weight"
_KL_DIFFUSERS_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"


def vae_layout(keys: Collection[str]) -> VaeLayout | None:
    """The VAE layout of a file with these keys (a whole model's VAE counts as ``"kl"``); None if none.

    TAESD's standalone files are bare sequences of convolutions (``N.weight``) and residual blocks
    (``N.conv.0.weight``): the encoder's starts with a convolution, the decoder's with its clamp.
    """
    if _KL_KEY in keys or VAE_PREFIX + _KL_KEY in keys:
        return "kl"
    if _KL_DIFFUSERS_KEY in keys:
        return "kl-diffusers"
    if any(re.fullmatch(r"\d+\.conv\.0\.weight", key) for key in keys):
        if "0.weight" in keys:
            return "taesd-encoder"
        if "1.weight" in keys:
            return "taesd-decoder"
    return None


def is_whole_model(keys: Collection[str]) -> bool:
    """True if the keys hold an original single file's U-Net (a whole model, not a part of one)."""
    return any(key.startswith(UNET_PREFIX) for key in keys)


# ---------------------------------------------------------------------------
# Applying a key map
# ---------------------------------------------------------------------------


def check_shape(entry: Entry, shape: tuple[int, ...]) -> None:
    if tuple(shape) != entry.original_shape:
        raise CheckpointError(
            f"shape mismatch for {entry.original}: the file has {list(shape)}, the model needs "
            f"{list(entry.original_shape)}; the checkpoint does not match the detected architecture"
        )


def to_diffusers(entry: Entry, tensor: torch.Tensor, diffusers_shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The diffusers tensor(s) stored in one original tensor (shape already checked)."""
    if entry.transform == "copy":
        return {entry.diffusers[0]: tensor}
    if entry.transform == "conv1x1":
        return {entry.diffusers[0]: tensor.reshape(diffusers_shapes[entry.diffusers[0]])}
    if entry.transform == "transpose":
        return {entry.diffusers[0]: tensor.t().contiguous()}
    return {key: own_storage(part) for key, part in zip(entry.diffusers, tensor.chunk(3, dim=0))}


def own_storage(part: torch.Tensor) -> torch.Tensor:
    """A contiguous slice of a CPU tensor as a tensor with a storage of its own over the same memory, no copy.

    OpenCLIP's fused attention input projection holds q, k and v one after the other; each is a block of rows.
    A view would share the fused tensor's storage, which safetensors refuses to save; a copy would cost the
    time to make it (a third of SDXL's fp32 load) and its memory, and would leave the file's pages of the fused
    tensor resident beside it. A storage slice (as safetensors makes one per tensor of a file) points into the
    same memory, keeps it alive, and stays in the file's mapping, so its pages go back to the page cache after
    use (``ldm.paging``). Off the CPU, or not contiguous (a ``.ckpt`` may hold a transposed fused tensor): a copy.
    """
    if part.device.type != "cpu" or not part.is_contiguous():
        return part.clone(memory_format=torch.contiguous_format)
    start = part.storage_offset() * part.element_size()
    storage = part.untyped_storage()[start : start + part.numel() * part.element_size()]
    return torch.empty(0, dtype=part.dtype).set_(storage, 0, part.shape, part.stride())


def to_original(entry: Entry, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The original tensor of one entry, from the diffusers tensors."""
    if entry.transform == "copy":
        return tensors[entry.diffusers[0]]
    if entry.transform == "conv1x1":
        return tensors[entry.diffusers[0]].reshape(entry.original_shape)
    if entry.transform == "transpose":
        return tensors[entry.diffusers[0]].t()
    return torch.cat([tensors[key] for key in entry.diffusers], dim=0)


def describe_key_mismatch(missing: list[str], unexpected: list[str], where: str) -> str:
    """One line naming the first few missing and unexpected keys and their counts."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({', '.join(sorted(missing)[:3])}{', ...' * (len(missing) > 3)})")
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:3]) + ", ..." * (len(unexpected) > 3)
        parts.append(f"{len(unexpected)} unexpected key(s) ({shown})")
    return f"{where} does not match the architecture: {'; '.join(parts)}; is it a Stable Diffusion 1.x/2.x/XL checkpoint?"
