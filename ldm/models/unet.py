"""The text-conditioned denoising U-Net of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3.3 and appendix E).

    conv_in -> down levels (ResNet blocks [+ spatial transformer], then 2x downsample) pushing skips
            -> middle (ResNet, transformer, ResNet)
            -> up levels popping skips (concat, ResNet blocks [+ transformer], then 2x upsample)
            -> GroupNorm, SiLU, conv_out

Behaviour attached from outside (``ldm.speedups``) travels with a call as ``UNetHooks``: a
self-attention hook per transformer block and a replacement for the block loop; nothing is stored on
the modules, so one U-Net serves concurrent calls with different hooks.

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis", sec. 2.1-2.2) is the same network with a stack of transformer blocks per level
(``transformer_layers_per_block``), no attention at the top level, and more input to the time
embedding (diffusers' ``addition_embed_type="text_time"``): the pooled text embedding and the
micro-conditioning numbers (``time_ids``: original size, crop top-left and target size, or the
refiner's aesthetic score in place of the target size), each number embedded sinusoidally:

    temb = time_embedding(sin(t)) + add_embedding([text_embeds, sin(time_ids[0]), ..., sin(time_ids[n-1])])

Every module attribute is named after diffusers' ``UNet2DConditionModel`` checkpoint keys, so a
diffusers ``unet/`` folder loads with ``strict=True`` and no renaming.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.errors import ConfigError, InputError
from ldm.models._config import as_int, as_int_tuple, check_defaults, check_range
from ldm.models.attention import NO_HOOKS, AttentionBackend, SelfAttentionHooks, SpatialTransformer, set_attention
from ldm.models.layers import Downsample, ResnetBlock, Upsample, join_skip, repeat_rows


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted eps / v / x0 channels
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per resolution level
    layers_per_block: int = 2  # ResNet blocks per down level (up levels have one more)
    cross_attention_levels: tuple[bool, ...] = (True, True, True, False)  # transformer per down level; up mirrors
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # heads per level; the middle uses the last level's
    cross_attention_dim: int = 768  # width of the text encoder's hidden states
    use_linear_projection: bool = False  # transformer proj_in/out: Linear (SD 2.x) or 1x1 conv (SD 1.x)
    upcast_attention: bool = False  # fp32 attention scores (SD 2.1 overflows in fp16 otherwise)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64  # native latent size (image size / 8)
    # Width of an extra condition added to the time embedding's input (diffusers' ``cond_proj``): the
    # guidance-scale embedding of guidance-distilled models such as LCM (Luo et al. 2023); None: no such input.
    time_cond_proj_dim: int | None = None
    # Transformer blocks in each level's spatial transformers (SDXL: 1, 2, 10; the middle takes the last
    # level's); None: one everywhere (SD 1.x / 2.x).
    transformer_layers_per_block: tuple[int, ...] | None = None
    # SDXL's added conditioning ("text_time": the pooled text embedding and the micro-conditioning numbers,
    # added to the time embedding); None: the time embedding alone. The two widths below belong to it.
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None  # sinusoidal width of each micro-conditioning number (256)
    projection_class_embeddings_input_dim: int | None = None  # add_embedding's input: pooled width + n * the above

    def __post_init__(self) -> None:
        for key, (low, high) in _BOUNDS.items():
            if getattr(self, key) is not None:
                check_range("UNet", key, getattr(self, key), low, high)
        levels = len(self.block_out_channels)
        if not 1 <= levels <= _MAX_LEVELS:
            raise ConfigError(f"UNet config key 'block_out_channels' has {levels} levels; ldm accepts 1 to {_MAX_LEVELS}")
        if len(self.cross_attention_levels) != levels or len(self.num_attention_heads) != levels:
            raise ConfigError(
                f"UNetConfig needs one cross_attention_levels and num_attention_heads entry per block_out_channels "
                f"entry ({levels})"
            )
        for width, heads in zip(self.block_out_channels, self.num_attention_heads):
            if width % heads or width % self.norm_num_groups:
                raise ConfigError(
                    f"UNet width {width} must be divisible by its head count {heads} and by norm_num_groups "
                    f"{self.norm_num_groups}"
                )
        depths = self.transformer_layers_per_block
        if depths is not None and len(depths) != levels:
            raise ConfigError(f"UNet config key 'transformer_layers_per_block' needs one entry per level ({levels})")
        self._check_addition()

    def _check_addition(self) -> None:
        widths = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type not in _ADDITION_TYPES:
            raise ConfigError(
                f"UNet config key 'addition_embed_type'={self.addition_embed_type!r} is not supported "
                "(ldm supports null and 'text_time', SDXL's)"
            )
        if self.addition_embed_type is None and widths != (None, None):
            raise ConfigError(
                "UNet config keys 'addition_time_embed_dim' and 'projection_class_embeddings_input_dim' need "
                "addition_embed_type 'text_time'"
            )
        if self.addition_embed_type == "text_time" and None in widths:
            raise ConfigError(
                "UNet config addition_embed_type 'text_time' needs 'addition_time_embed_dim' and "
                "'projection_class_embeddings_input_dim'"
            )

    def transformer_depth(self, level: int) -> int:
        """The transformer blocks of each spatial transformer of down ``level`` (and of its mirrored up level)."""
        return 1 if self.transformer_layers_per_block is None else self.transformer_layers_per_block[level]

    @classmethod
    def sd1(cls) -> UNetConfig:
        """Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5)."""
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        """Stable Diffusion 2.1 (768-v): 64-channel heads, OpenCLIP-H context, linear projections."""
        return cls(
            num_attention_heads=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
            sample_size=96,
        )

    @classmethod
    def sdxl(cls) -> UNetConfig:
        """SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0): three levels, no attention at the top,
        1, 2 and 10 transformer blocks, context of CLIP ViT-L and OpenCLIP bigG side by side (768 + 1280),
        pooled bigG text (1280) and six micro-conditioning numbers added to the time embedding."""
        return cls(
            block_out_channels=(320, 640, 1280),
            cross_attention_levels=(False, True, True),
            num_attention_heads=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            sample_size=128,
            transformer_layers_per_block=(1, 2, 10),
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=1280 + 6 * 256,
        )

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """SDXL 1.0 refiner (stabilityai/stable-diffusion-xl-refiner-1.0): four levels of 384 base channels,
        attention at the middle two with 4 blocks each, bigG context only (1280), five micro-conditioning
        numbers (the aesthetic score in place of the target size)."""
        return cls(
            block_out_channels=(384, 768, 1536, 1536),
            cross_attention_levels=(False, True, True, False),
            num_attention_heads=(6, 12, 24, 24),
            cross_attention_dim=1280,
            use_linear_projection=True,
            sample_size=128,
            transformer_layers_per_block=(4, 4, 4, 4),
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=1280 + 5 * 256,
        )

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A 2.2M-parameter U-Net of SD 1.x structure (diffusers_unet("sd1") in tests/tiny_models.py), for tests."""
        return cls(
            block_out_channels=(32, 64, 64),
            cross_attention_levels=(True, True, False),
            num_attention_heads=(8, 8, 8),
            cross_attention_dim=64,
            sample_size=8,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Read a diffusers ``unet/config.json`` (as a dict); unsupported variants raise ``ConfigError``."""
        check_defaults(config, _DIFFUSERS_DEFAULTS, _MODELED_KEYS, "UNet")
        down = list(config.get("down_block_types", [_DOWN_TYPES[True]] * 3 + [_DOWN_TYPES[False]]))
        for name in down:
            if name not in _DOWN_TYPES.values():
                raise ConfigError(f"UNet config key 'down_block_types' has unsupported block {name!r}")
        levels = tuple(name == _DOWN_TYPES[True] for name in down)
        expected_up = [_UP_TYPES[cross] for cross in reversed(levels)]
        up = list(config.get("up_block_types", expected_up))
        if up != expected_up:
            raise ConfigError(f"UNet config key 'up_block_types'={up!r} must mirror down_block_types ({expected_up!r})")
        if config.get("num_attention_heads") is not None:
            raise ConfigError(
                "UNet config key 'num_attention_heads' must be null (diffusers stores heads in 'attention_head_dim')"
            )
        # diffusers' "attention_head_dim" holds the number of heads for SD models (diffusers issue #2011).
        heads = as_int_tuple(config, "attention_head_dim", "UNet", (8,))
        if len(heads) == 1:
            heads = heads * len(levels)
        widths = as_int_tuple(config, "block_out_channels", "UNet", (320, 640, 1280, 1280))
        for key, count in (("down_block_types", len(levels)), ("attention_head_dim", len(heads))):
            if count != len(widths):
                raise ConfigError(f"UNet config key {key!r} has {count} entries for {len(widths)} block_out_channels")
        cross_dim = as_int(config, "cross_attention_dim", "UNet", 1280)
        sample_size = config.get("sample_size") or 64  # diffusers allows null: no native size
        if isinstance(sample_size, (list, tuple)):
            if len(set(sample_size)) != 1:
                raise ConfigError(f"UNet config key 'sample_size'={list(sample_size)!r} must be square")
            sample_size = sample_size[0]
        return cls(
            in_channels=as_int(config, "in_channels", "UNet", 4),
            out_channels=as_int(config, "out_channels", "UNet", 4),
            block_out_channels=widths,
            layers_per_block=as_int(config, "layers_per_block", "UNet", 2),
            cross_attention_levels=levels,
            num_attention_heads=heads,
            cross_attention_dim=cross_dim,
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            norm_num_groups=as_int(config, "norm_num_groups", "UNet", 32),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            sample_size=int(sample_size),
            time_cond_proj_dim=_optional_int(config, "time_cond_proj_dim"),
            transformer_layers_per_block=_transformer_depths(config, len(levels)),
            addition_embed_type=config.get("addition_embed_type"),
            addition_time_embed_dim=_optional_int(config, "addition_time_embed_dim"),
            projection_class_embeddings_input_dim=_optional_int(config, "projection_class_embeddings_input_dim"),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A ``config.json`` dict that diffusers' ``UNet2DConditionModel`` builds the same network from."""
        fields = asdict(self)
        levels = fields.pop("cross_attention_levels")
        heads = fields.pop("num_attention_heads")
        # diffusers' defaults are left out: configs of plain models stay as they were.
        for key in ("time_cond_proj_dim", "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if fields[key] is None:
                del fields[key]
        if fields["transformer_layers_per_block"] is None:
            del fields["transformer_layers_per_block"]
        return {
            "_class_name": "UNet2DConditionModel",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            "down_block_types": [_DOWN_TYPES[cross] for cross in levels],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": [_UP_TYPES[cross] for cross in reversed(levels)],
            "attention_head_dim": list(heads),
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        }


# What a config may ask for: well above every SD-family model (widths up to 1280, 2 layers per
# block, 4 levels, 64 to 128 latents), well below what exhausts a machine's memory.
_BOUNDS = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "block_out_channels": (1, 8192),
    "layers_per_block": (1, 16),
    "num_attention_heads": (1, 1024),
    "cross_attention_dim": (1, 8192),
    "norm_num_groups": (1, 8192),
    "sample_size": (1, 1024),
    "time_cond_proj_dim": (1, 8192),
    "transformer_layers_per_block": (1, 64),
    "addition_time_embed_dim": (2, 8192),
    "projection_class_embeddings_input_dim": (1, 65536),
}
_ADDITION_TYPES = (None, "text_time")
_MAX_LEVELS = 8
_DOWN_TYPES = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
_UP_TYPES = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}
_MODELED_KEYS = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "attention_head_dim", "num_attention_heads", "cross_attention_dim", "use_linear_projection",
    "upcast_attention", "norm_num_groups", "norm_eps", "sample_size", "time_cond_proj_dim",
    "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
}  # fmt: skip
# Every other UNet2DConditionModel argument, with the only value we implement (diffusers' default).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


def _optional_int(config: Mapping[str, Any], key: str) -> int | None:
    return None if config.get(key) is None else as_int(config, key, "UNet", 0)


def _transformer_depths(config: Mapping[str, Any], levels: int) -> tuple[int, ...] | None:
    """diffusers' ``transformer_layers_per_block`` (one int, or one per level) as one per level; None when all are 1."""
    depths = as_int_tuple(config, "transformer_layers_per_block", "UNet", (1,))
    if len(depths) == 1:
        depths = depths * levels
    if len(depths) != levels:
        raise ConfigError(f"UNet config key 'transformer_layers_per_block' has {len(depths)} entries for {levels} levels")
    return None if set(depths) == {1} else depths


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), fp32 (Ho et al. 2020, appendix B; Vaswani et al. 2017,
    sec. 3.5), in SD's layout: cos half first (``flip_sin_to_cos``), frequencies 10000^(-i/half)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(10000.0) / half)
    angles = timesteps.float()[:, None] * exponent.exp()[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """The time embedding MLP; with ``cond_dim``, a condition (LCM's guidance-scale embedding) is projected
    to the sinusoidal embedding's width and added to it before the MLP, as diffusers' ``cond_proj`` does."""

    def __init__(self, channels: int, embed_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        self.cond_proj = None if cond_dim is None else nn.Linear(cond_dim, channels, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise InputError("this U-Net takes no timestep_cond (its config has no time_cond_proj_dim); leave it out")
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


class _Block(nn.Module):
    """A U-Net stage: runs its layers, each under activation checkpointing when enabled and training."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def _run(self, layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class DownBlock(_Block):
    def __init__(self, cfg: UNetConfig, level: int, in_channels: int, temb_channels: int):
        super().__init__()
        out = cfg.block_out_channels[level]
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out, out, temb_channels, g, eps) for i in range(cfg.layers_per_block)
        )
        if cfg.cross_attention_levels[level]:
            self.attentions = nn.ModuleList(
                _transformer(cfg, level) for _ in range(cfg.layers_per_block)
            )
        else:
            self.attentions = None
        is_last = level == len(cfg.block_out_channels) - 1
        self.downsamplers = None if is_last else nn.ModuleList([Downsample(out)])

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
        hooks: SelfAttentionHooks = NO_HOOKS,
    ) -> torch.Tensor:
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context, hooks)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x

    def layer(
        self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, hooks: SelfAttentionHooks = NO_HOOKS
    ) -> torch.Tensor:
        """Layer ``i``: its ResNet, then its transformer if the level has them (the output is skip ``i + 1``)."""
        x = self._run(self.resnets[i], x, temb)
        if self.attentions is not None:
            x = self._run(self.attentions[i], x, context, hooks)
        return x


class MidBlock(_Block):
    def __init__(self, cfg: UNetConfig, temb_channels: int):
        super().__init__()
        ch = cfg.block_out_channels[-1]
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_channels, g, eps), ResnetBlock(ch, ch, temb_channels, g, eps)])
        self.attentions = nn.ModuleList([_transformer(cfg, len(cfg.block_out_channels) - 1)])

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, hooks: SelfAttentionHooks = NO_HOOKS
    ) -> torch.Tensor:
        x = self._run(self.resnets[0], x, temb)
        x = self._run(self.attentions[0], x, context, hooks)
        return self._run(self.resnets[1], x, temb)


class UpBlock(_Block):
    """Up level ``i`` (counted from the deepest): ``layers_per_block + 1`` ResNets, each eating one skip."""

    def __init__(self, cfg: UNetConfig, i: int, temb_channels: int):
        super().__init__()
        widths = cfg.block_out_channels[::-1]
        level = len(widths) - 1 - i  # the down level this up level mirrors
        out, prev = widths[i], widths[max(i - 1, 0)]
        below = widths[min(i + 1, len(widths) - 1)]  # width of the skips pushed before this level's down block
        g, eps, n = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock((prev if j == 0 else out) + (below if j == n - 1 else out), out, temb_channels, g, eps)
            for j in range(n)
        )
        if cfg.cross_attention_levels[level]:
            self.attentions = nn.ModuleList(_transformer(cfg, level) for _ in range(n))
        else:
            self.attentions = None
        self.upsamplers = None if level == 0 else nn.ModuleList([Upsample(out)])

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
        hooks: SelfAttentionHooks = NO_HOOKS,
    ) -> torch.Tensor:
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context, skips, hooks)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])
        return x

    def layer(
        self,
        i: int,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
        hooks: SelfAttentionHooks = NO_HOOKS,
    ) -> torch.Tensor:
        """Layer ``i``: its ResNet on ``x`` joined with the last skip (popped), then its transformer if any."""
        x = self._run(self.resnets[i], join_skip(x, skips), temb)
        if self.attentions is not None:
            x = self._run(self.attentions[i], x, context, hooks)
        return x


def _check_text_batch(sample: torch.Tensor, context: torch.Tensor) -> None:
    if context.shape[0] % sample.shape[0]:
        raise InputError(
            f"the U-Net got {context.shape[0]} text embeddings for {sample.shape[0]} samples; pass a multiple of the sample count"
        )


def _checked_condition(condition: torch.Tensor, sample: torch.Tensor, width: int | None) -> torch.Tensor:
    """``condition`` in the sample's dtype, once its shape is (1 or B, width)."""
    rows = sorted({1, sample.shape[0]})
    if width is not None and (condition.ndim != 2 or condition.shape[1] != width or condition.shape[0] not in rows):
        shown = " or ".join(map(str, rows))
        raise InputError(f"timestep_cond has shape {tuple(condition.shape)}; this U-Net takes ({shown}, {width})")
    return condition.to(sample.dtype)


def added_embedding(
    add_embedding: nn.Module | None,
    cfg: UNetConfig,
    text_embeds: torch.Tensor | None,
    time_ids: torch.Tensor | None,
    sample: torch.Tensor,
    rows: int,
) -> torch.Tensor | None:
    """SDXL's added embedding (``rows``, 4 * C) of a U-Net or its ControlNet: ``add_embedding`` of the pooled text
    beside the sinusoidal embedding of each micro-conditioning number; None for a network without one."""
    if add_embedding is None:
        if text_embeds is not None or time_ids is not None:
            raise InputError("this U-Net takes no text_embeds or time_ids (it is not an SDXL U-Net); leave them out")
        return None
    if text_embeds is None or time_ids is None:
        raise InputError("this SDXL U-Net needs text_embeds (the pooled text embedding) and time_ids (the micro-conditioning numbers)")
    _check_added(text_embeds, time_ids, sample.shape[0], rows, cfg)
    numbers = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim).reshape(time_ids.shape[0], -1)
    added = torch.cat([text_embeds.float(), repeat_rows(numbers, rows)], dim=-1)
    return add_embedding(added.to(sample.dtype))


def _check_added(text_embeds: torch.Tensor, time_ids: torch.Tensor, samples: int, rows: int, cfg: UNetConfig) -> None:
    """``text_embeds`` (rows, P) and ``time_ids`` (1, samples or rows; n) must fill ``add_embedding``'s input."""
    if text_embeds.ndim != 2 or text_embeds.shape[0] != rows:
        raise InputError(
            f"text_embeds has shape {tuple(text_embeds.shape)}; pass one pooled embedding per text row ({rows}, width)"
        )
    if time_ids.ndim != 2 or time_ids.shape[0] not in {1, samples, rows} or rows % time_ids.shape[0]:
        raise InputError(f"time_ids has shape {tuple(time_ids.shape)}; pass (1, n), ({samples}, n) or ({rows}, n)")
    width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise InputError(
            f"text_embeds of width {text_embeds.shape[1]} and {time_ids.shape[1]} time_ids embed to {width} values; "
            f"this U-Net takes {cfg.projection_class_embeddings_input_dim} (SDXL base: 1280 and 6, the refiner: 1280 and 5)"
        )


def _transformer(cfg: UNetConfig, level: int) -> SpatialTransformer:
    """A spatial transformer of down ``level`` (its up mirror and, for the last level, the middle)."""
    return SpatialTransformer(
        cfg.block_out_channels[level],
        cfg.num_attention_heads[level],
        cfg.cross_attention_dim,
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        cfg.upcast_attention,
        cfg.transformer_depth(level),
    )


class BlockLoop(Protocol):
    """The U-Net's block loop, or what replaces it for one call (``UNetHooks.blocks``).

    ``x``: ``conv_in``'s output, ``temb``: the time embedding, ``skips``: ``[x]``, to which the down path
    pushes and from which the up path pops; returns the feature map before the output head.
    """

    def __call__(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor], hooks: UNetHooks
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class ControlResiduals:
    """What a ControlNet adds to a U-Net (Zhang et al. 2023, eq. 2; ``ldm.models.controlnet``): one tensor per
    skip connection, in the order the down path pushes them, and one for the middle block's output
    (diffusers' ``down_block_additional_residuals`` and ``mid_block_additional_residual``)."""

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        """The sum of two ControlNets' residuals (diffusers' ``MultiControlNetModel``)."""
        return ControlResiduals(tuple(add_rows(a, b) for a, b in zip(self.down, other.down)), add_rows(self.mid, other.mid))

    def scaled(self, scales: torch.Tensor | float) -> ControlResiduals:
        """Residual i times ``scales[i]`` (the middle block's: the last), or all times one float."""
        if isinstance(scales, float):
            return ControlResiduals(tuple(r * scales for r in self.down), self.mid * scales)
        return ControlResiduals(tuple(r * s for r, s in zip(self.down, scales)), self.mid * scales[-1])

    def added_to_skips(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(skips) != len(self.down):
            raise InputError(f"got {len(self.down)} ControlNet residuals for the U-Net's {len(skips)} skip connections")
        return [add_rows(skip, residual) for skip, residual in zip(skips, self.down)]


def add_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` where either may hold one row per shared sample (``repeat_rows``) and the other k rows each."""
    rows = max(a.shape[0], b.shape[0])
    return repeat_rows(a, rows) + repeat_rows(b, rows)


@dataclass(frozen=True)
class UNetHooks:
    """What one U-Net call runs differently, attached from outside the network (``ldm.speedups``).

    The hook points that diffusers' ``hooks/`` and ComfyUI's model patches attach to, passed with the
    call (as diffusers' ``cross_attention_kwargs`` or ComfyUI's ``transformer_options``) and never stored
    on a module.
    """

    # Per BasicTransformerBlock: computes its self-attention (token merging).
    self_attention: SelfAttentionHooks = field(default_factory=dict)
    # Runs in place of UNet.run_blocks, between conv_in and the output head (DeepCache).
    blocks: BlockLoop | None = None
    # Added to the skips and the middle block's output by UNet.run_blocks (a ControlNet's; set per call).
    residuals: ControlResiduals | None = None


class UNet(nn.Module):
    """eps/v-prediction network epsilon_theta(z_t, t, tau(y)) of Rombach et al. 2022, eq. 3."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        widths = config.block_out_channels
        temb = widths[0] * 4
        self.time_embedding = TimestepEmbedding(widths[0], temb, config.time_cond_proj_dim)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb)
        else:
            self.add_embedding = None
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(config, level, widths[max(level - 1, 0)], temb) for level in range(len(widths))
        )
        self.mid_block = MidBlock(config, temb)
        self.up_blocks = nn.ModuleList(UpBlock(config, i, temb) for i in range(len(widths)))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, widths[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hooks: UNetHooks | None = None,
        timestep_cond: torch.Tensor | None = None,
        residuals: ControlResiduals | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise (or v) of ``sample`` at ``timestep`` given the text ``encoder_hidden_states``.

        sample: (B, in_channels, h, w); timestep: one value, or one per sample (B,);
        encoder_hidden_states: (k * B, 77, cross_attention_dim). With k > 1 each sample is shared by
        k embeddings and the result has k * B rows, equal to passing ``torch.cat([sample] * k)``:
        classifier-free guidance passes its latents once, and the layers before the first
        cross-attention (conv_in, a ResNet and a 4096-token self-attention at 512x512) run once
        instead of k times. ``hooks`` change what this call runs (see ``UNetHooks``). ``timestep_cond``
        (1 or B rows of ``time_cond_proj_dim``) is the extra time condition of a guidance-distilled U-Net.
        ``residuals``: a ControlNet's, added to the skips and the middle block's output.

        An SDXL U-Net (``addition_embed_type="text_time"``) also takes, as diffusers' ``added_cond_kwargs``,
        ``text_embeds``: the pooled text embedding, one row per row of ``encoder_hidden_states``, and
        ``time_ids``: the micro-conditioning numbers (1, B or k * B rows). The time embedding then differs
        per text row, so the samples are repeated to the k * B rows after ``conv_in``.
        """
        hooks = UNetHooks() if hooks is None else hooks
        if residuals is not None:
            if hooks.blocks is not None:
                raise InputError("a replaced block loop (DeepCache) does not add ControlNet residuals; run without it")
            hooks = replace(hooks, residuals=residuals)
        context = encoder_hidden_states
        _check_text_batch(sample, context)
        temb = self.embed_time(timestep, sample, timestep_cond)
        added = self.embed_added(text_embeds, time_ids, sample, context.shape[0])
        if added is not None:
            temb = repeat_rows(temb, added.shape[0]) + added
        x = repeat_rows(self.conv_in(sample), temb.shape[0])
        run_blocks = self.run_blocks if hooks.blocks is None else hooks.blocks
        x = run_blocks(x, temb, context, [x], hooks)
        return self.head(x)  # the middle's cross-attention made it k * B rows

    def embed_time(
        self, timestep: torch.Tensor | float | int, sample: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The time embedding (B, 4 * C) of ``timestep`` (one value, or one per sample) for the B rows of ``sample``,
        with the extra time ``condition`` (1 or B rows) of a guidance-distilled U-Net."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        if condition is not None:
            condition = _checked_condition(condition, sample, self.config.time_cond_proj_dim)
        return self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype), condition)

    def embed_added(
        self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None, sample: torch.Tensor, rows: int
    ) -> torch.Tensor | None:
        """SDXL's added embedding (``rows``, 4 * C), added to the time embedding (Podell et al. 2023, sec. 2.2):
        ``add_embedding`` of the pooled text beside the sinusoidal embedding of each micro-conditioning number;
        None for a U-Net without it."""
        return added_embedding(self.add_embedding, self.config, text_embeds, time_ids, sample, rows)

    def run_blocks(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor], hooks: UNetHooks
    ) -> torch.Tensor:
        """The block loop (a ``BlockLoop``): down levels push skips, the middle, up levels pop them."""
        for block in self.down_blocks:
            x = block(x, temb, context, skips, hooks.self_attention)
        x = self.mid_block(x, temb, context, hooks.self_attention)
        if hooks.residuals is not None:
            skips[:] = hooks.residuals.added_to_skips(skips)
            x = add_rows(x, hooks.residuals.mid)
        for block in self.up_blocks:
            x = block(x, temb, context, skips, hooks.self_attention)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The output head: GroupNorm, SiLU, ``conv_out``."""
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def set_attention(self, backend: AttentionBackend, slice_size: int | None = None) -> None:
        """Compute attention with ``backend`` (see ``ldm.models.attention``)."""
        set_attention(self, backend, slice_size)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (training mode only) to save memory."""
        for module in self.modules():
            if isinstance(module, _Block):
                module.gradient_checkpointing = enabled
