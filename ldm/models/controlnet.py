"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder (its down levels and middle block) reads the noisy latents plus
an embedding of the control image c_f (sec. 3.3: a small convolutional encoder E brings the 512x512
map to the 64x64 latent grid) and returns, through zero-initialised 1x1 convolutions Z, one residual
per U-Net skip connection and one for the middle block (sec. 3.2, eq. 2):

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)

    conv_in(z_t) + E(c) -> down levels (skips s_0 .. s_n) -> middle block m
    residuals: (Z_0(s_0), .., Z_n(s_n)), Z_mid(m)

The frozen U-Net adds them to its skips and its middle block's output (``ldm.models.unet.ControlResiduals``).
Scaling, the guidance window and "guess mode" are the caller's (``ldm.pipeline.control``): this module
is the network only.

Every attribute is named after diffusers' ``ControlNetModel`` keys (``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block``); the down levels and middle block are the U-Net's
own ``DownBlock`` and ``MidBlock``. The original single-file layout (``zero_convs``,
``input_hint_block``, ``middle_block_out``) is renamed in ``ldm.loading.controlnet``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError, InputError
from ldm.models._config import check_range
from ldm.models.attention import AttentionBackend, set_attention
from ldm.models.layers import repeat_rows
from ldm.models.unet import (
    ControlResiduals,
    DownBlock,
    MidBlock,
    TimestepEmbedding,
    UNetConfig,
    added_embedding,
    timestep_embedding,
)

ChannelOrder = ("rgb", "bgr")


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the U-Net encoder it copies, and its control-image encoder."""

    # The copied encoder: in_channels, block_out_channels, layers_per_block, cross_attention_levels, heads,
    # cross_attention_dim, projections, norms (the up-path fields of a UNetConfig are not used).
    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3  # channels of the control image
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)  # E's widths; each step after the first halves the size
    channel_order: str = "rgb"  # "bgr": the network was trained on BGR control images (channels flipped before E)
    # Shuffle-type models: each residual averaged over its spatial grid, and applied to the conditional batch only.
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        check_range("ControlNet", "conditioning_channels", self.conditioning_channels, 1, 64)
        widths = self.conditioning_embedding_out_channels
        check_range("ControlNet", "conditioning_embedding_out_channels", list(widths), 1, 8192)
        if not 1 <= len(widths) <= 8:
            raise ConfigError(f"ControlNet config key 'conditioning_embedding_out_channels' has {len(widths)} entries; ldm accepts 1 to 8")
        if self.channel_order not in ChannelOrder:
            raise ConfigError(f"ControlNet config key 'controlnet_conditioning_channel_order'={self.channel_order!r} must be rgb or bgr")

    @property
    def downsample_factor(self) -> int:
        """How much smaller than the control image the latent grid is (8 for SD's ControlNets)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def residual_count(self) -> int:
        """Residuals for the U-Net's skips: conv_in's, one per down layer, one per downsampler."""
        levels = len(self.unet.block_out_channels)
        return 1 + levels * self.unet.layers_per_block + levels - 1

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> ControlNetConfig:
        """Read a diffusers ``ControlNetModel`` ``config.json`` (as a dict); unsupported variants raise ``ConfigError``."""
        config = dict(config)
        own = {key: config.pop(key) for key in _OWN_KEYS if key in config}
        mid = config.pop("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid != "UNetMidBlock2DCrossAttn":
            raise ConfigError(f"ControlNet config key 'mid_block_type'={mid!r} is not supported (ldm supports UNetMidBlock2DCrossAttn)")
        for key in ("up_block_types", "out_channels", "sample_size", "time_cond_proj_dim"):
            if key in config:  # a U-Net's keys, which a ControlNetModel does not have
                raise ConfigError(f"ControlNet config key {key!r} is unknown to ldm; is this a U-Net's config?")
        widths = own.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        if not isinstance(widths, (list, tuple)) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            raise ConfigError(f"ControlNet config key 'conditioning_embedding_out_channels'={widths!r} must be a list of integers")
        return cls(
            unet=UNetConfig.from_diffusers(config),
            conditioning_channels=_int(own.get("conditioning_channels", 3), "conditioning_channels"),
            conditioning_embedding_out_channels=tuple(widths),
            channel_order=own.get("controlnet_conditioning_channel_order", "rgb"),
            global_pool_conditions=bool(own.get("global_pool_conditions", False)),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A ``config.json`` dict that diffusers' ``ControlNetModel`` builds the same network from."""
        unet = self.unet.to_diffusers()
        for key in ("up_block_types", "out_channels", "sample_size", "time_cond_proj_dim"):
            unet.pop(key, None)
        return {
            **unet,
            "_class_name": "ControlNetModel",
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": self.channel_order,
            "global_pool_conditions": self.global_pool_conditions,
        }


_OWN_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order", "global_pool_conditions")


def _int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"ControlNet config key {key!r}={value!r} must be an integer")
    return value


class HintEmbedding(nn.Module):
    """E(c): the control image to the latent grid (sec. 3.3): conv_in, then per width step a 3x3 conv and a
    strided 3x3 conv, SiLU after each, and a zero-initialised conv_out to the U-Net's first width."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        widths = config.conditioning_embedding_out_channels
        self.conv_in = nn.Conv2d(config.conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, wider in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, wider, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], config.unet.block_out_channels[0], 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(image))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """The residuals of the U-Net skips and middle block for latents ``sample`` and a control image."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        unet = config.unet
        widths = unet.block_out_channels
        temb = widths[0] * 4
        self.time_embedding = TimestepEmbedding(widths[0], temb)
        # SDXL's: the pooled text and micro-conditioning numbers, added to the time embedding as in the U-Net.
        text_time = unet.addition_embed_type == "text_time"
        self.add_embedding = TimestepEmbedding(unet.projection_class_embeddings_input_dim, temb) if text_time else None
        self.conv_in = nn.Conv2d(unet.in_channels, widths[0], 3, padding=1)
        self.controlnet_cond_embedding = HintEmbedding(config)
        self.down_blocks = nn.ModuleList(DownBlock(unet, level, widths[max(level - 1, 0)], temb) for level in range(len(widths)))
        skip_widths = [widths[0]]
        for level, width in enumerate(widths):
            skip_widths += [width] * (unet.layers_per_block + (level < len(widths) - 1))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(width, width, 1) for width in skip_widths)
        self.mid_block = MidBlock(unet, temb)
        self.controlnet_mid_block = nn.Conv2d(widths[-1], widths[-1], 1)

    def embed_hint(self, image: torch.Tensor) -> torch.Tensor:
        """E(c) of control images (N, conditioning_channels, H, W) in [0, 1]; it depends on nothing else, so a
        call computes it once for all its steps."""
        if image.ndim != 4 or image.shape[1] != self.config.conditioning_channels:
            raise InputError(
                f"the control image tensor has shape {tuple(image.shape)}; this ControlNet takes "
                f"(N, {self.config.conditioning_channels}, H, W)"
            )
        if self.config.channel_order == "bgr":
            image = image.flip(1)
        return self.controlnet_cond_embedding(image)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> ControlResiduals:
        """Unscaled residuals for ``sample`` (B, C, h, w) at ``timestep`` given the text states (k * B rows,
        shared as the U-Net shares them) and ``hint``, the control image's ``embed_hint`` (1 or B rows, h x w).
        An SDXL ControlNet also reads the rows' pooled text and micro-conditioning numbers, as the U-Net does."""
        if hint.shape[-2:] != sample.shape[-2:]:
            raise InputError(
                f"the control image embeds to {tuple(hint.shape[-2:])} but the latents are {tuple(sample.shape[-2:])}; "
                f"give a control image {self.config.downsample_factor}x the latent size"
            )
        if encoder_hidden_states.shape[0] % sample.shape[0]:
            raise InputError(
                f"the ControlNet got {encoder_hidden_states.shape[0]} text embeddings for {sample.shape[0]} samples; "
                "pass a multiple of the sample count"
            )
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.config.unet.block_out_channels[0]).to(sample.dtype))
        added = added_embedding(self.add_embedding, self.config.unet, text_embeds, time_ids, sample, encoder_hidden_states.shape[0])
        if added is not None:  # the time embedding differs per text row: so do the rows from conv_in on
            temb = repeat_rows(temb, added.shape[0]) + added
        x = repeat_rows(self.conv_in(sample) + hint, temb.shape[0])  # (B | 1 rows of the hint broadcast)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, encoder_hidden_states, skips)
        x = self.mid_block(x, temb, encoder_hidden_states)
        down = tuple(zero_conv(skip) for zero_conv, skip in zip(self.controlnet_down_blocks, skips))
        mid = self.controlnet_mid_block(x)
        if self.config.global_pool_conditions:
            down = tuple(r.mean(dim=(2, 3), keepdim=True) for r in down)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlResiduals(down, mid)

    def set_attention(self, backend: AttentionBackend, slice_size: int | None = None) -> None:
        """Compute attention with ``backend`` (see ``ldm.models.attention``)."""
        set_attention(self, backend, slice_size)


# What a U-Net and a ControlNet's encoder must share for its residuals to fit the U-Net's skips.
_BASE_FIELDS = ("cross_attention_dim", "block_out_channels", "layers_per_block", "cross_attention_levels", "addition_embed_type")


def fits(config: ControlNetConfig, unet: UNetConfig) -> bool:
    """Whether a ControlNet of ``config`` can steer a U-Net of ``unet``: its encoder reads the latents the U-Net
    predicts (an inpainting U-Net takes a mask and masked latents besides: the ControlNet sees the latents alone)
    and has the U-Net's text width and block layout."""
    same = all(getattr(config.unet, name) == getattr(unet, name) for name in _BASE_FIELDS)
    return same and config.unet.in_channels == unet.out_channels


def describe_base(unet: UNetConfig) -> str:
    """The base a U-Net config is, in the words a mismatch error uses."""
    return (
        f"cross-attention width {unet.cross_attention_dim}, block channels {list(unet.block_out_channels)}, "
        f"{unet.layers_per_block} layers per block, {unet.out_channels} latent channels"
    )
