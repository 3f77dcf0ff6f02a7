"""What a single-file checkpoint holds, read from its keys and tensor shapes alone.

An original SD checkpoint carries no config. Everything that shapes determine
is read from shapes; what they do not determine follows the conventions of the
released checkpoints (``tests/tiny_models.py`` keeps them too):

- U-Net heads: 8 per level for SD 1.x, 64-channel heads for SD 2.x.
- 32 GroupNorm groups (U-Net and VAE), CLIP heads of width 64.
- SD 2.x U-Nets use ``upcast_attention`` (as SD 2.1; it only matters in fp16).
- ``sample_size``: 64 latents (512 px), 96 (768 px) for SD 2.x v-prediction.

The family is read from the text encoder's layout: ``cond_stage_model.transformer``
(OpenAI CLIP, SD 1.x) or ``cond_stage_model.model`` (OpenCLIP, SD 2.x). The
U-Net's cross-attention width must equal the text encoder's width.

SDXL files hold their text encoders under ``conditioner.embedders.N``: CLIP ViT-L
(``0.transformer``) and OpenCLIP bigG (``1.model``) for the base model, bigG alone
(``0.model``) for the refiner. What their shapes do not give follows the released
SDXL 1.0 configs: 64-channel U-Net heads, no upcast attention, 256-wide sinusoids
per micro-conditioning number (``addition_time_embed_dim``), 128 latents (1024 px),
the VAE's ``scaling_factor`` 0.13025 and ``force_upcast``; a level without
attention has one transformer block, or as many as every other level when they
all have the same (the refiner's 4). The U-Net's cross-attention width must equal
the encoders' widths together, and its added conditioning must take the pooled
bigG output and a whole number of micro-conditioning numbers.

Prediction type, first rule that applies:
1. the ``prediction_type=`` argument;
2. a ``v_pred`` key (ComfyUI's marker) or safetensors metadata
   ``modelspec.prediction_type`` ("v" / "epsilon" / "sample"; Stability's model spec key);
3. SD 1.x: epsilon;
   SDXL: epsilon (otherwise);
4. SD 2.x .ckpt with ``global_step``: 875000 is the 512-base model (epsilon), any
   other step is v-prediction (diffusers' rule);
5. SD 2.x without a step (safetensors): ComfyUI's rule, v-prediction when the
   standard deviation of the last output block's first transformer norm bias
   exceeds 0.09 (v-trained SD 2.x 768 models), epsilon otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import CLIPTextConfig

from ldm.errors import CheckpointError
from ldm.loading.keymap import (
    SD2_TEXT_PREFIX,
    SDXL_BIGG_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_CONDITIONER_PREFIX,
    SDXL_REFINER_BIGG_PREFIX,
    TEXT_SLOTS,
    UNET_PREFIX,
    VAE_PREFIX,
    text_slot,
)
from ldm.models.text_encoder import clip_config, clip_config_2

Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]
SDXL_FAMILIES = ("sdxl", "sdxl-refiner")
PredictionType = Literal["epsilon", "v_prediction", "sample"]
# ComfyUI's marker keys: v-prediction, zero terminal SNR (beside v_pred in the v-prediction models trained so),
# and the EDM models' (Playground v2.5's latent statistics, CosXL's sigma range).
V_PRED_KEY = "v_pred"
ZERO_SNR_KEY = "ztsnr"
EDM_KEYS = ("edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")

# The OpenCLIP ViT-H text tower has 24 blocks; a 1024-wide file with 23 was written
# without the unused last block (diffusers' old conversion script does that).
_VIT_H_WIDTH, _VIT_H_BLOCKS = 1024, 24
# SDXL's conventions (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 configs).
SDXL_TIME_EMBED_DIM = 256
SDXL_LATENT_SIZE = 128
SDXL_SCALING_FACTOR = 0.13025


@dataclass(frozen=True)
class Detected:
    """Architecture of a single-file checkpoint, as diffusers config dicts plus the CLIP config."""

    family: Family
    unet: dict[str, Any]  # a diffusers unet/config.json
    vae: dict[str, Any]  # a diffusers vae/config.json
    text: CLIPTextConfig | None  # text_encoder; None: the family has none (SDXL refiner)
    text_blocks_in_file: int  # OpenCLIP resblocks stored (SD 2.x); text.num_hidden_layers for CLIP names
    prediction_type: PredictionType
    text_2: CLIPTextConfig | None = None  # text_encoder_2 (SDXL's OpenCLIP bigG); None: the family has none


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"the checkpoint has no {key}; it is not a Stable Diffusion 1.x/2.x/XL model")
    return shapes[key]


def _indices(shapes: Mapping[str, Any], pattern: str) -> set[int]:
    found = set()
    for key in shapes:
        if m := re.match(pattern, key):
            found.add(int(m[1]))
    return found


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    if UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(
            "unknown architecture: no model.diffusion_model.* U-Net keys; expected an original SD 1.x/2.x/XL "
            "checkpoint (.safetensors/.ckpt) or a diffusers folder"
        )
    if any(k.startswith(SDXL_CONDITIONER_PREFIX) for k in shapes):
        return _sdxl_family(shapes)
    if SD2_TEXT_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in shapes:
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd1"
    raise CheckpointError(
        "unknown architecture: no cond_stage_model.* text encoder keys (OpenAI CLIP for SD 1.x, OpenCLIP for "
        "SD 2.x) and no SDXL conditioner.embedders.*; ldm needs a full SD checkpoint"
    )


def _sdxl_family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """SDXL base (CLIP ViT-L as embedder 0, OpenCLIP bigG as embedder 1) or refiner (bigG alone, as embedder 0)."""
    bigg_key = "transformer.resblocks.0.attn.in_proj_weight"
    if SDXL_CLIP_L_PREFIX + "embeddings.token_embedding.weight" in shapes and SDXL_BIGG_PREFIX + bigg_key in shapes:
        return "sdxl"
    if SDXL_REFINER_BIGG_PREFIX + bigg_key in shapes and not any(k.startswith("conditioner.embedders.1.") for k in shapes):
        return "sdxl-refiner"
    embedders = sorted({".".join(k.split(".")[:4]) for k in shapes if k.startswith(SDXL_CONDITIONER_PREFIX)})
    raise CheckpointError(
        f"unknown SDXL text encoders ({', '.join(embedders)}); ldm reads SDXL base (CLIP ViT-L + OpenCLIP bigG) "
        "and refiner (OpenCLIP bigG) files"
    )


def unet_config(shapes: Mapping[str, tuple[int, ...]], family: Family, sample_size: int) -> dict[str, Any]:
    p = UNET_PREFIX
    conv_in = _shape(shapes, p + "input_blocks.0.0.weight")
    downsamplers = sorted(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight"))
    if not downsamplers:
        raise CheckpointError("unknown U-Net layout: no downsampling blocks (input_blocks.N.0.op.weight)")
    layers = downsamplers[0] - 1
    step = layers + 1
    num_blocks = 1 + max(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\."))
    if num_blocks % step:
        raise CheckpointError(f"unknown U-Net layout: {num_blocks} input blocks is not a multiple of {step}")
    levels = num_blocks // step
    channels = [_shape(shapes, f"{p}input_blocks.{1 + i * step}.0.in_layers.2.weight")[0] for i in range(levels)]
    cross = [f"{p}input_blocks.{1 + i * step}.1.proj_in.weight" in shapes for i in range(levels)]
    proj_in = _shape(shapes, f"{p}middle_block.1.proj_in.weight")
    context = _shape(shapes, f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    if family == "sd1":
        heads = [8] * levels
    else:
        if any(c % 64 for c in channels):
            raise CheckpointError(f"U-Net channels {channels} are not multiples of the SD 2.x/XL head width 64")
        heads = [c // 64 for c in channels]
    down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross]
    up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)]
    config = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": conv_in[1],
        "out_channels": _shape(shapes, p + "out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": up,
        "attention_head_dim": heads,
        "cross_attention_dim": context,
        "use_linear_projection": len(proj_in) == 2,
        "upcast_attention": family == "sd2",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "sample_size": sample_size,
    }
    if family in SDXL_FAMILIES:
        config.update(sdxl_unet_fields(shapes, cross, step))
    return config


def sdxl_unet_fields(
    shapes: Mapping[str, tuple[int, ...]], cross: Sequence[bool], step: int, p: str = UNET_PREFIX
) -> dict[str, Any]:
    """Transformer blocks per level and the added conditioning of an SDXL U-Net (module docstring), or of an SDXL
    ControlNet's copy of its encoder: original-layout keys behind ``p``."""

    def depth(block: str) -> int:
        return 1 + max(_indices(shapes, re.escape(f"{p}{block}.1.transformer_blocks.") + r"(\d+)\."))

    middle = depth("middle_block")
    found = [depth(f"input_blocks.{1 + i * step}") if c else None for i, c in enumerate(cross)]
    uniform = {d for d in found if d is not None} <= {middle}
    depths = [d if d is not None else (middle if uniform or i == len(cross) - 1 else 1) for i, d in enumerate(found)]
    label = _shape(shapes, p + "label_emb.0.0.weight")
    return {
        "transformer_layers_per_block": depths,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": label[1],
    }


def vae_config(shapes: Mapping[str, tuple[int, ...]], sample_size: int, family: Family = "sd1") -> dict[str, Any]:
    p = VAE_PREFIX
    levels = 1 + max(_indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\."), default=-1)
    if levels == 0:
        raise CheckpointError("unknown architecture: no first_stage_model.encoder.down.* VAE keys")
    layers = 1 + max(_indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [_shape(shapes, f"{p}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": _shape(shapes, p + "post_quant_conv.weight")[0],
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": SDXL_SCALING_FACTOR if family in SDXL_FAMILIES else 0.18215,
        "force_upcast": family in SDXL_FAMILIES,
    }


def taesd_config(encoder: Mapping[str, tuple[int, ...]], decoder: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """A diffusers ``AutoencoderTiny`` config.json read from the shapes of TAESD's standalone files.

    Each file is one sequence of convolutions (``N.weight``) and residual blocks (``N.conv.0.weight``);
    the blocks between consecutive convolutions are one level's. The encoder's first convolution
    reads the image and its last makes the latents; the decoder's first reads the latents and its
    last makes the image.
    """
    enc_convs, enc_blocks = _taesd_sequence(encoder, "encoder")
    dec_convs, dec_blocks = _taesd_sequence(decoder, "decoder")
    levels = len(enc_blocks)
    return {
        "_class_name": "AutoencoderTiny",
        "in_channels": encoder[enc_convs[0]][1],
        "out_channels": decoder[dec_convs[-1]][0],
        "latent_channels": encoder[enc_convs[-1]][0],
        "encoder_block_out_channels": [encoder[enc_convs[0]][0]] * levels,
        "decoder_block_out_channels": [decoder[dec_convs[0]][0]] * len(dec_blocks),
        "num_encoder_blocks": enc_blocks,
        "num_decoder_blocks": dec_blocks,
    }


def taesd_decoder_config(decoder: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """``taesd_config`` of a decoder file alone: the encoder's fields mirror the decoder's (the encoder is not
    built from them; a decoder-only TAESD cannot encode)."""
    dec_convs, dec_blocks = _taesd_sequence(decoder, "decoder")
    width = decoder[dec_convs[0]][0]
    return {
        "_class_name": "AutoencoderTiny",
        "in_channels": decoder[dec_convs[-1]][0],
        "out_channels": decoder[dec_convs[-1]][0],
        "latent_channels": decoder[dec_convs[0]][1],
        "encoder_block_out_channels": [width] * len(dec_blocks),
        "decoder_block_out_channels": [width] * len(dec_blocks),
        "num_encoder_blocks": [1] + [3] * (len(dec_blocks) - 1),
        "num_decoder_blocks": dec_blocks,
    }


def _taesd_sequence(shapes: Mapping[str, tuple[int, ...]], part: str) -> tuple[list[str], list[int]]:
    """The convolution weights of one TAESD file, in order, and the number of blocks between each two."""
    convs: list[str] = []
    blocks: list[int] = []
    for index in sorted(_indices(shapes, r"(\d+)\.")):
        if f"{index}.weight" in shapes:
            convs.append(f"{index}.weight")
            blocks.append(0)
        elif f"{index}.conv.0.weight" in shapes and convs:
            blocks[-1] += 1
        else:
            raise CheckpointError(f"unknown TAESD {part} layout at layer {index}; expected convolutions and residual blocks")
    if len(convs) < 2 or blocks[-1]:
        raise CheckpointError(f"unknown TAESD {part} layout: it must end in a convolution after its blocks")
    return convs, blocks[:-1]


def stored_text_blocks(shapes: Mapping[str, Any], family: Family, slot: int = 0) -> int:
    """How many transformer blocks the file's text encoder ``slot`` stores."""
    place = text_slot(family, slot)
    pattern = r"encoder\.layers\.(\d+)\." if place.layout == "clip" else r"transformer\.resblocks\.(\d+)\."
    return 1 + max(_indices(shapes, re.escape(place.prefix) + pattern), default=-1)


def text_config(shapes: Mapping[str, tuple[int, ...]], family: Family, slot: int = 0) -> tuple[CLIPTextConfig, int]:
    """The CLIPTextConfig of text encoder ``slot`` (0: ``text_encoder``, 1: ``text_encoder_2``), and how many
    transformer blocks the file stores."""
    place = text_slot(family, slot)
    p = place.prefix
    blocks = stored_text_blocks(shapes, family, slot)
    base = (clip_config if slot == 0 else clip_config_2)(family).to_dict()
    if place.layout == "clip":
        vocab, width = _shape(shapes, p + "embeddings.token_embedding.weight")
        positions = _shape(shapes, p + "embeddings.position_embedding.weight")[0]
        inner = _shape(shapes, p + "encoder.layers.0.mlp.fc1.weight")[0]
        layers = blocks
    else:
        vocab, width = _shape(shapes, p + "token_embedding.weight")
        positions = _shape(shapes, p + "positional_embedding")[0]
        inner = _shape(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        layers = _openclip_layers(width, blocks, place.projected)
        if place.projected:
            base["projection_dim"] = _shape(shapes, p + "text_projection")[1]
    if width % 64:
        raise CheckpointError(f"text encoder width {width} is not a multiple of the CLIP head width 64")
    base.update(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_attention_heads=width // 64,
        num_hidden_layers=layers,
        max_position_embeddings=positions,
    )
    return CLIPTextConfig(**base), blocks


def _openclip_layers(width: int, blocks: int, projected: bool) -> int:
    """The blocks an OpenCLIP tower runs: all of them where its pooled projection is used (SDXL). SD 2.x
    conditions on the penultimate block: the last stored block is never run."""
    if projected:
        return blocks
    lacks_unused_block = width == _VIT_H_WIDTH and blocks == _VIT_H_BLOCKS - 1
    layers = blocks if lacks_unused_block else blocks - 1
    if layers < 1:
        raise CheckpointError(f"the OpenCLIP text encoder has {blocks} block(s); SD 2.x needs at least 2")
    return layers


def detect_prediction_type(
    family: Family,
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str],
    global_step: int | None,
    read: Callable[[str], torch.Tensor],
) -> PredictionType:
    """Rules 2-5 of the module docstring."""
    if V_PRED_KEY in shapes:
        return "v_prediction"
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("v", "v_prediction"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    if spec == "sample":
        return "sample"
    if family != "sd2":
        return "epsilon"
    if global_step is not None:
        return "epsilon" if global_step == 875000 else "v_prediction"
    last = max(_indices(shapes, re.escape(UNET_PREFIX) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias"))
    bias = read(f"{UNET_PREFIX}output_blocks.{last}.1.transformer_blocks.0.norm1.bias").float()
    return "v_prediction" if bias.std(unbiased=False).item() > 0.09 else "epsilon"


def detect(
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str],
    global_step: int | None,
    read: Callable[[str], torch.Tensor],
    prediction_type: PredictionType | None = None,
) -> Detected:
    """Family, configs and prediction type of a single file (keys already normalized)."""
    family = detect_family(shapes)
    prediction = prediction_type or detect_prediction_type(family, shapes, metadata, global_step, read)
    latent_size = _LATENT_SIZES.get(family, 64)
    if family == "sd2" and prediction == "v_prediction":
        latent_size = 96
    slots = TEXT_SLOTS[family]
    text, blocks = text_config(shapes, family, 0) if slots[0] is not None else (None, 0)
    text_2 = text_config(shapes, family, 1)[0] if slots[1] is not None else None
    unet = unet_config(shapes, family, latent_size)
    _check_text_fits(unet, text, text_2)
    vae = vae_config(shapes, 8 * latent_size, family)
    return Detected(family, unet, vae, text, blocks, prediction, text_2)


_LATENT_SIZES = {"sdxl": SDXL_LATENT_SIZE, "sdxl-refiner": SDXL_LATENT_SIZE}


def _check_text_fits(unet: dict[str, Any], text: CLIPTextConfig | None, text_2: CLIPTextConfig | None) -> None:
    """The U-Net attends to the text encoders' states side by side and (SDXL) embeds text_2's pooled output."""
    widths = [config.hidden_size for config in (text, text_2) if config is not None]
    if unet["cross_attention_dim"] != sum(widths):
        raise CheckpointError(
            f"the U-Net attends to {unet['cross_attention_dim']}-wide context but the text encoder states are "
            f"{' + '.join(map(str, widths))} wide; the checkpoint mixes parts of different models"
        )
    added = unet.get("projection_class_embeddings_input_dim")
    if added is None:
        return
    if text_2 is None:
        raise CheckpointError("the U-Net takes SDXL's added conditioning but the file has no OpenCLIP bigG text encoder")
    numbers = added - text_2.projection_dim
    if numbers <= 0 or numbers % SDXL_TIME_EMBED_DIM:
        raise CheckpointError(
            f"the U-Net's added conditioning takes {added} values, which is not the pooled text ({text_2.projection_dim}) "
            f"and whole {SDXL_TIME_EMBED_DIM}-wide micro-conditioning numbers; pass config= a model folder"
        )
