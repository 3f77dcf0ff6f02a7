"""TAESD, the tiny autoencoder distilled from SD's VAE (Ollin Boer Bohan, github.com/madebyollin/taesd),
as diffusers builds it (``AutoencoderTiny``).

    image in [-1, 1] -> (x + 1) / 2 -> encoder.layers -> latents (B, 4, H/8, W/8), deterministic
    latents -> 3 tanh(z / 3) -> decoder.layers -> 2 y - 1 -> image in [-1, 1]

Each encoder level is a 3x3 convolution (stride 2 after the first level) and residual blocks of three
3x3 convolutions with ReLU (``TinyBlock``); the decoder mirrors it with nearest-neighbour 2x
upsampling. There is no normalization and no attention, so an output pixel depends only on a
bounded neighbourhood of the input.

Latents: TAESD was distilled to reproduce SD's latents *after* scaling, so its ``scaling_factor``
is 1.0 (diffusers' convention) and the pipeline's ``latents / scaling_factor`` changes nothing.
``encode`` returns a ``PointPosterior``: the encoder is deterministic and draws no noise.

Attributes follow diffusers' keys: ``encoder.layers.N`` and ``decoder.layers.N``, with the entries
that hold no weights (ReLU, Upsample) keeping their index, so an ``AutoencoderTiny`` folder loads
strictly without renaming. The original standalone files (``taesd_encoder.pth``,
``taesd_decoder.pth``) name the same sequences without the prefix, the decoder's indices one higher
(its first entry is the clamp); ``ldm.loading.keymap.taesd_entries`` maps them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError, InputError
from ldm.models._config import as_int, as_int_tuple, check_defaults, check_range
from ldm.models.attention import AttentionBackend, set_attention
from ldm.models.vae import _tiled

_CLAMP = 3.0  # the decoder squashes latents into (-3, 3): 3 tanh(z / 3)


@dataclass(frozen=True)
class TAESDConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3
    latent_channels: int = 4  # 4 for SD 1.x / 2.x / XL; TAESD3 and TAEF1 have 16
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)  # width per level; 2^(levels-1) downsampling
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # residual blocks per encoder level
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # residual blocks per decoder level
    scaling_factor: float = 1.0  # TAESD's latents are already SD's scaled latents
    force_upcast: bool = False  # decode in fp32 under fp16 (a precision hint, as VAEConfig's; TAESD needs none)

    def __post_init__(self) -> None:
        for key, (low, high) in _BOUNDS.items():
            check_range("TAESD", key, getattr(self, key), low, high)
        for part in ("encoder", "decoder"):
            widths, blocks = self.widths(part), self.blocks(part)
            if not 1 <= len(widths) <= _MAX_LEVELS or len(blocks) != len(widths):
                raise ConfigError(
                    f"TAESD config: {part} has {len(widths)} widths and {len(blocks)} block counts; "
                    f"ldm accepts 1 to {_MAX_LEVELS} levels, one count per width"
                )
            # diffusers chains each level's convolution from its own width, so only equal widths run.
            if len(set(widths)) != 1:
                raise ConfigError(f"TAESD config key '{part}_block_out_channels'={list(widths)} must hold one width for every level")
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ConfigError("TAESD config: the encoder and decoder must have as many levels (the same downsampling)")
        if not 0 < self.scaling_factor < float("inf"):
            raise ConfigError(f"TAESD config key 'scaling_factor'={self.scaling_factor!r} must be a positive number")

    def widths(self, part: str) -> tuple[int, ...]:
        return {"encoder": self.encoder_block_out_channels, "decoder": self.decoder_block_out_channels}[part]

    def blocks(self, part: str) -> tuple[int, ...]:
        return {"encoder": self.num_encoder_blocks, "decoder": self.num_decoder_blocks}[part]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def tiny(cls) -> TAESDConfig:
        """The same structure at width 16 with one block per level, for tests."""
        return cls(
            encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
        )  # fmt: skip

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> TAESDConfig:
        """Read a diffusers ``AutoencoderTiny`` ``config.json`` (as a dict); other variants raise ``ConfigError``."""
        check_defaults(config, _DIFFUSERS_DEFAULTS, _MODELED_KEYS, "TAESD")
        default = cls()
        return cls(
            in_channels=as_int(config, "in_channels", "TAESD", default.in_channels),
            out_channels=as_int(config, "out_channels", "TAESD", default.out_channels),
            latent_channels=as_int(config, "latent_channels", "TAESD", default.latent_channels),
            encoder_block_out_channels=as_int_tuple(config, "encoder_block_out_channels", "TAESD", default.encoder_block_out_channels),
            decoder_block_out_channels=as_int_tuple(config, "decoder_block_out_channels", "TAESD", default.decoder_block_out_channels),
            num_encoder_blocks=as_int_tuple(config, "num_encoder_blocks", "TAESD", default.num_encoder_blocks),
            num_decoder_blocks=as_int_tuple(config, "num_decoder_blocks", "TAESD", default.num_decoder_blocks),
            scaling_factor=float(config.get("scaling_factor", default.scaling_factor)),
            force_upcast=config.get("force_upcast", False) is True,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A ``config.json`` dict that diffusers' ``AutoencoderTiny`` builds the same network from."""
        return {
            "_class_name": "AutoencoderTiny",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "encoder_block_out_channels": list(self.encoder_block_out_channels),
            "decoder_block_out_channels": list(self.decoder_block_out_channels),
            "num_encoder_blocks": list(self.num_encoder_blocks),
            "num_decoder_blocks": list(self.num_decoder_blocks),
            "scaling_factor": self.scaling_factor,
            **({"force_upcast": True} if self.force_upcast else {}),  # diffusers' default (false) left out
        }


_BOUNDS = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "latent_channels": (1, 64),
    "encoder_block_out_channels": (1, 8192),
    "decoder_block_out_channels": (1, 8192),
    "num_encoder_blocks": (0, 16),
    "num_decoder_blocks": (0, 16),
}
_MAX_LEVELS = 8
_MODELED_KEYS = {
    "in_channels", "out_channels", "latent_channels", "encoder_block_out_channels", "decoder_block_out_channels",
    "num_encoder_blocks", "num_decoder_blocks", "scaling_factor",
    "block_out_channels",  # diffusers writes the decoder's widths again under this name
    "force_upcast",
    # For storing latents as 8-bit images (diffusers' scale_latents); encode and decode do not use them.
    "latent_magnitude", "latent_shift",
}  # fmt: skip
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    "shift_factor": 0.0,  # SD 3 / FLUX latents are shifted; ldm's SD 1.x / 2.x pipeline does not shift
}


class PointPosterior:
    """TAESD's encoding: one latent per image, not a distribution (diffusers' ``AutoencoderTinyOutput``).

    It offers the img2img interface of ``DiagonalGaussian``: ``sample_with(noise)`` returns the latents
    and never calls ``noise``, so no random number is drawn. diffusers' img2img reads ``.latents`` of
    a tiny autoencoder and draws none either, so a seed's later draws stay diffusers'.
    """

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample_with(self, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.latents


class TinyBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x): diffusers' ``AutoencoderTinyBlock`` of equal widths."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x) + x)


class TinyEncoder(nn.Module):
    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        width = cfg.encoder_block_out_channels[0]
        layers: list[nn.Module] = []
        for level, blocks in enumerate(cfg.num_encoder_blocks):
            if level == 0:
                layers.append(nn.Conv2d(cfg.in_channels, width, 3, padding=1))
            else:
                layers.append(nn.Conv2d(width, width, 3, padding=1, stride=2, bias=False))
            layers += [TinyBlock(width) for _ in range(blocks)]
        layers.append(nn.Conv2d(width, cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original TAESD takes images in [0, 1].
        return self.layers(x.add(1).div(2))


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        width, levels = cfg.decoder_block_out_channels[0], len(cfg.num_decoder_blocks)
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, width, 3, padding=1), nn.ReLU()]
        for level, blocks in enumerate(cfg.num_decoder_blocks):
            last = level == levels - 1
            layers += [TinyBlock(width) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(width, cfg.out_channels if last else width, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # The original TAESD makes images in [0, 1].
        return self.layers(torch.tanh(z / _CLAMP) * _CLAMP).mul(2).sub(1)


class TAESD(nn.Module):
    """The tiny autoencoder, with the interface the pipeline uses of a VAE (``AutoencoderKL``'s)."""

    def __init__(self, config: TAESDConfig):
        super().__init__()
        self.config = config
        self.encoder: TinyEncoder | None = TinyEncoder(config)  # None: loaded from a decoder file alone
        self.decoder = TinyDecoder(config)

    def encode(self, x: torch.Tensor) -> PointPosterior:
        """Images (B, 3, H, W) in [-1, 1] -> the latents (B, C, H/8, W/8), scaled as the U-Net's."""
        if self.encoder is None:
            raise InputError(
                "this TAESD was loaded from its taesd_decoder file alone, so it cannot encode an image (img2img); "
                "put its taesd_encoder file beside it"
            )
        return PointPosterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        return self.decoder(z)

    def decode_sliced(self, z: torch.Tensor) -> torch.Tensor:
        """``decode`` one batch element at a time: peak memory of a batch of one."""
        return torch.cat([self.decode(z[i : i + 1]) for i in range(z.shape[0])], dim=0)

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """``decode`` in overlapping latent tiles blended as ``AutoencoderKL.decode_tiled`` blends them.

        TAESD has no normalization or attention, so tiles agree except within its receptive field of
        their edges; the crossfade hides that. Not bit-equal to ``decode`` for images larger than a tile.
        """
        f = self.config.downsample_factor
        return _tiled(self.decode, z, tile, overlap, lambda n: n * f)

    def encode_tiled(self, x: torch.Tensor, tile: int = 64, overlap: int = 16) -> PointPosterior:
        """``encode`` in overlapping tiles of ``tile`` latent pixels, blended as ``AutoencoderKL.encode_tiled`` blends them."""
        f = self.config.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise InputError(f"image size {tuple(x.shape[-2:])} must be a multiple of {f} to encode in tiles")
        return PointPosterior(_tiled(lambda t: self.encode(t).latents, x, tile * f, overlap * f, lambda n: n // f))

    def set_attention(self, backend: AttentionBackend, slice_size: int | None = None) -> None:
        """Checks ``backend`` as every network does; TAESD has no attention layer to switch."""
        set_attention(self, backend, slice_size)
