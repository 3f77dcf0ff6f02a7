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

Prediction type, first rule that applies:
1. the ``prediction_type=`` argument;
2. a ``v_pred`` key (ComfyUI's marker) or safetensors metadata
   ``modelspec.prediction_type`` ("v" / "epsilon" / "sample"; Stability's model spec key);
3. SD 1.x: epsilon;
4. SD 2.x .ckpt with ``global_step``: 875000 is the 512-base model (epsilon), any
   other step is v-prediction (diffusers' rule);
5. SD 2.x without a step (safetensors): ComfyUI's rule, v-prediction when the
   standard deviation of the last output block's first transformer norm bias
   exceeds 0.09 (v-trained SD 2.x 768 models), epsilon otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import CLIPTextConfig

from ldm.errors import CheckpointError
from ldm.loading.keymap import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.models.text_encoder import clip_config

Family = Literal["sd1", "sd2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]

# The OpenCLIP ViT-H text tower has 24 blocks; a 1024-wide file with 23 was written
# without the unused last block (diffusers' old conversion script does that).
_VIT_H_WIDTH, _VIT_H_BLOCKS = 1024, 24


@dataclass(frozen=True)
class Detected:
    """Architecture of a single-file checkpoint, as diffusers config dicts plus the CLIP config."""

    family: Family
    unet: dict[str, Any]  # a diffusers unet/config.json
    vae: dict[str, Any]  # a diffusers vae/config.json
    text: CLIPTextConfig
    text_blocks_in_file: int  # OpenCLIP resblocks stored (SD 2.x); text.num_hidden_layers for SD 1.x
    prediction_type: PredictionType


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"the checkpoint has no {key}; it is not a Stable Diffusion 1.x/2.x model")
    return shapes[key]


def _indices(shapes: Mapping[str, Any], pattern: str) -> set[int]:
    found = set()
    for key in shapes:
        if m := re.match(pattern, key):
            found.add(int(m[1]))
    return found


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise CheckpointError("this looks like an SDXL checkpoint (conditioner.embedders.*); ldm loads SD 1.x and 2.x only")
    if UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(
            "unknown architecture: no model.diffusion_model.* U-Net keys; expected an original SD 1.x/2.x "
            "checkpoint (.safetensors/.ckpt) or a diffusers folder"
        )
    if SD2_TEXT_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in shapes:
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd1"
    raise CheckpointError(
        "unknown architecture: no cond_stage_model.* text encoder keys (OpenAI CLIP for SD 1.x, OpenCLIP for "
        "SD 2.x); ldm needs a full SD checkpoint"
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
            raise CheckpointError(f"U-Net channels {channels} are not multiples of the SD 2.x head width 64")
        heads = [c // 64 for c in channels]
    down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross]
    up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)]
    return {
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


def vae_config(shapes: Mapping[str, tuple[int, ...]], sample_size: int) -> dict[str, Any]:
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
        "scaling_factor": 0.18215,
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


def stored_text_blocks(shapes: Mapping[str, Any], family: Family) -> int:
    """How many transformer blocks the file's text encoder stores."""
    if family == "sd1":
        return 1 + max(_indices(shapes, re.escape(SD1_TEXT_PREFIX) + r"encoder\.layers\.(\d+)\."), default=-1)
    return 1 + max(_indices(shapes, re.escape(SD2_TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\."), default=-1)


def text_config(shapes: Mapping[str, tuple[int, ...]], family: Family) -> tuple[CLIPTextConfig, int]:
    """The CLIPTextConfig, and how many transformer blocks the file stores."""
    if family == "sd1":
        p = SD1_TEXT_PREFIX
        vocab, width = _shape(shapes, p + "embeddings.token_embedding.weight")
        positions = _shape(shapes, p + "embeddings.position_embedding.weight")[0]
        blocks = stored_text_blocks(shapes, family)
        inner = _shape(shapes, p + "encoder.layers.0.mlp.fc1.weight")[0]
        layers = blocks
    else:
        p = SD2_TEXT_PREFIX
        vocab, width = _shape(shapes, p + "token_embedding.weight")
        positions = _shape(shapes, p + "positional_embedding")[0]
        blocks = stored_text_blocks(shapes, family)
        inner = _shape(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        # SD 2.x conditions on the penultimate block: the last stored block is never run.
        lacks_unused_block = width == _VIT_H_WIDTH and blocks == _VIT_H_BLOCKS - 1
        layers = blocks if lacks_unused_block else blocks - 1
        if layers < 1:
            raise CheckpointError(f"the OpenCLIP text encoder has {blocks} block(s); SD 2.x needs at least 2")
    if width % 64:
        raise CheckpointError(f"text encoder width {width} is not a multiple of the CLIP head width 64")
    config = clip_config(family).to_dict()
    config.update(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_attention_heads=width // 64,
        num_hidden_layers=layers,
        max_position_embeddings=positions,
    )
    return CLIPTextConfig(**config), blocks


def detect_prediction_type(
    family: Family,
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str],
    global_step: int | None,
    read: Callable[[str], torch.Tensor],
) -> PredictionType:
    """Rules 2-5 of the module docstring."""
    if "v_pred" in shapes:
        return "v_prediction"
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("v", "v_prediction"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    if spec == "sample":
        return "sample"
    if family == "sd1":
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
    latent_size = 96 if family == "sd2" and prediction == "v_prediction" else 64
    text, blocks = text_config(shapes, family)
    unet = unet_config(shapes, family, latent_size)
    if unet["cross_attention_dim"] != text.hidden_size:
        raise CheckpointError(
            f"the U-Net attends to {unet['cross_attention_dim']}-wide context but the text encoder is "
            f"{text.hidden_size} wide; the checkpoint mixes parts of different models"
        )
    return Detected(family, unet, vae_config(shapes, 8 * latent_size), text, blocks, prediction)
