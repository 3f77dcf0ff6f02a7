"""The KL-regularized autoencoder that maps images to SD's latent space (Rombach et al. 2022, sec. 3.1).

    image (B, 3, H, W) -> Encoder -> quant_conv -> DiagonalGaussian over latents (B, 4, H/8, W/8)
    latents -> post_quant_conv -> Decoder -> image in [-1, 1]

The posterior is a diagonal Gaussian (Kingma & Welling 2014, "Auto-Encoding Variational Bayes",
sec. 2.4, reparameterization z = mu + sigma * eps). Latents here are UNscaled; the pipeline
multiplies by ``VAEConfig.scaling_factor`` before diffusion.

Module attributes follow diffusers' ``AutoencoderKL`` keys. Large images: ``decode_tiled`` /
``encode_tiled`` (see ``_tiled`` below) and ``decode_sliced`` bound peak memory.
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
from ldm.models.attention import AttentionBackend, VAEAttention, set_attention
from ldm.models.layers import ResnetBlock
from ldm.models.vae_strips import decode_up, encode_down
from ldm.random import randn

_EPS = 1e-6  # GroupNorm epsilon throughout the SD VAE


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; 2^(levels-1) downsampling
    layers_per_block: int = 2  # ResNets per encoder level (decoder levels have one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents * scaling_factor have about unit variance (LDM sec. 3.1)
    sample_size: int = 512  # native image size
    # Decode in fp32 when the pipeline runs in fp16, as diffusers' SDXL pipelines do: SDXL's VAE overflows
    # fp16. A precision hint, not part of the network. A config without the key does not upcast (diffusers'
    # AutoencoderKL defaults it to true, but its SD 1.x / 2.x pipelines never read it; SDXL's configs set it).
    force_upcast: bool = False

    def __post_init__(self) -> None:
        for key, (low, high) in _BOUNDS.items():
            check_range("VAE", key, getattr(self, key), low, high)
        if not 1 <= len(self.block_out_channels) <= _MAX_LEVELS:
            raise ConfigError(
                f"VAE config key 'block_out_channels' has {len(self.block_out_channels)} levels; ldm accepts 1 to {_MAX_LEVELS}"
            )
        if not 0 < self.scaling_factor < float("inf"):
            raise ConfigError(f"VAE config key 'scaling_factor'={self.scaling_factor!r} must be a positive number")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ConfigError(f"VAE width {width} must be divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd(cls) -> VAEConfig:
        """The SD 1.x / 2.x autoencoder (f=8, 4 latent channels)."""
        return cls()

    @classmethod
    def sdxl(cls) -> VAEConfig:
        """The SDXL autoencoder: SD's architecture retrained, latents scaled by 0.13025, 1024 px, decoded in fp32."""
        return cls(scaling_factor=0.13025, sample_size=1024, force_upcast=True)

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Same structure and factor 8 at a tiny width, for tests."""
        return cls(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=64)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Read a diffusers ``vae/config.json`` (as a dict); unsupported variants raise ``ConfigError``."""
        check_defaults(config, _DIFFUSERS_DEFAULTS, _MODELED_KEYS, "VAE")
        widths = as_int_tuple(config, "block_out_channels", "VAE", (64,))
        for key, name in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            blocks = list(config.get(key, [name] * len(widths)))
            if blocks != [name] * len(widths):
                raise ConfigError(f"VAE config key {key!r}={blocks!r} must be {len(widths)} x {name!r}")
        sample_size = config.get("sample_size") or 32
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        return cls(
            in_channels=as_int(config, "in_channels", "VAE", 3),
            out_channels=as_int(config, "out_channels", "VAE", 3),
            latent_channels=as_int(config, "latent_channels", "VAE", 4),
            block_out_channels=widths,
            layers_per_block=as_int(config, "layers_per_block", "VAE", 1),
            norm_num_groups=as_int(config, "norm_num_groups", "VAE", 32),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            sample_size=int(sample_size),
            force_upcast=_flag(config, "force_upcast"),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A ``config.json`` dict that diffusers' ``AutoencoderKL`` builds the same network from."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "sample_size": self.sample_size,
            # Written when set: plain SD configs stay as they were (diffusers' SD pipelines never read the key).
            **({"force_upcast": True} if self.force_upcast else {}),
        }


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"VAE config key {key!r}={value!r} must be true or false")
    return value


# What a config may ask for: well above the SD VAE (widths up to 512, 512-1024 px samples), well
# below what exhausts a machine's memory.
_BOUNDS = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "latent_channels": (1, 64),
    "block_out_channels": (1, 8192),
    "layers_per_block": (1, 16),
    "norm_num_groups": (1, 8192),
    "sample_size": (1, 8192),
}
_MAX_LEVELS = 8
_MODELED_KEYS = {
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "norm_num_groups", "scaling_factor", "sample_size", "force_upcast",
}  # fmt: skip
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's 2*latent_channels output."""

    def __init__(self, moments: torch.Tensor):
        # moments: (B, 2*C, h, w) -> mean, logvar: (B, C, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)
        # The same clamp as the original LDM code keeps exp() finite for untrained or extreme inputs.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (reparameterization, Kingma & Welling 2014, eq. 10)."""
        eps = randn(tuple(self.mean.shape), generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps

    def sample_with(self, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """z = mean + std * eps with eps = ``noise()``, in eps's dtype and batch (mean broadcasts).

        The pipeline's img2img draws eps from each image's generator. The interface every encoder's
        result offers: TAESD's ``PointPosterior`` returns its latents without calling ``noise``.
        """
        eps = noise()
        return self.mean.to(eps.dtype) + self.std.to(eps.dtype) * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per batch element (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, None, groups, _EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only, as the original SD VAE does, so (H, W) maps exactly to (H/2, W/2).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([_Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class _DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([_Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _EncoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block, g, i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid_block = _MidBlock(widths[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dtype == torch.float32 and self.conv_in.weight.is_contiguous():
            # Inference in NCHW (not the channels-last set-up): the same function in row strips, in a fraction of
            # the memory (see vae_strips), whatever the layout of the image given (one result for one image).
            x = encode_down(self.conv_in, self.down_blocks, self.conv_norm_out.num_groups, x.contiguous())
        else:
            x = self.conv_in(x)
            for block in self.down_blocks:
                x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = _MidBlock(widths[0], g)
        self.up_blocks = nn.ModuleList(
            _DecoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1, g, i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        if not torch.is_grad_enabled() and x.dtype == torch.float32 and x.is_contiguous():
            # Inference: the same function in row strips, in a fraction of the memory (see vae_strips).
            return decode_up(self.up_blocks, self.conv_norm_out, self.conv_out, x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over UNscaled latents (B, 4, H/8, W/8)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """UNscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_sliced(self, z: torch.Tensor) -> torch.Tensor:
        """``decode`` one batch element at a time: peak memory of a batch of one."""
        return torch.cat([self.decode(z[i : i + 1]) for i in range(z.shape[0])], dim=0)

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """``decode`` in overlapping ``tile`` x ``tile`` latent tiles blended linearly (see ``_tiled``)."""
        f = self.config.downsample_factor
        return _tiled(self.decode, z, tile, overlap, lambda n: n * f)

    def encode_tiled(self, x: torch.Tensor, tile: int = 64, overlap: int = 16) -> DiagonalGaussian:
        """``encode`` in overlapping tiles of ``tile`` latent pixels (``tile * 8`` image pixels)."""
        f = self.config.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise InputError(f"image size {tuple(x.shape[-2:])} must be a multiple of {f} to encode in tiles")
        moments = _tiled(lambda t: self.quant_conv(self.encoder(t)), x, tile * f, overlap * f, lambda n: n // f)
        return DiagonalGaussian(moments)

    def set_attention(self, backend: AttentionBackend, slice_size: int | None = None) -> None:
        """Compute the middle blocks' attention with ``backend`` (see ``ldm.models.attention``)."""
        set_attention(self, backend, slice_size)



def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, length) with stride tile - overlap; the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(length: int, overlap: int, start_ramp: bool, end_ramp: bool, like: torch.Tensor) -> torch.Tensor:
    """1-D blend weight of a tile: 1 inside, fading at a side shared with a neighbour tile.

    Across a shared ``overlap`` the weight is 0 on the quarter nearest the tile's edge (where the
    tile's content is most affected by the missing context), then rises linearly to 1 over the middle
    half. The neighbour's weight is the mirror image, so the two sum to 1 throughout the overlap.
    """
    margin = overlap // 4
    span = max(overlap - 2 * margin, 1)
    i = torch.arange(min(overlap, length), dtype=torch.float32, device=like.device)
    up = ((i + 0.5 - margin) / span).clamp(0.0, 1.0)
    w = torch.ones(length, dtype=torch.float32, device=like.device)
    if start_ramp and overlap > 0:
        w[: up.numel()] = up
    if end_ramp and overlap > 0:
        w[length - up.numel() :] = torch.minimum(w[length - up.numel() :], up.flip(0))
    return w


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: Callable[[int], int],
) -> torch.Tensor:
    """Apply a size-scaling image-to-image ``fn`` tile by tile and blend the results.

    Tiles of ``tile`` input pixels overlap by ``overlap``. Each output tile is weighted by a
    separable window (``_ramp``) that fades it out towards every side it shares with a neighbour
    (and is flat 1 at the image border); the weighted tiles are summed and divided by the summed
    weights. Within an overlap one tile fades out as the next fades in, so the result is a
    continuous crossfade with no seam where tiles differ (e.g. by GroupNorm statistics). The
    quarter of the overlap nearest a tile's edge gets weight 0, so a network whose receptive
    field reaches less than that far gives exactly the untiled result. Peak memory is one
    tile's activations plus the output.
    """
    if not 0 <= overlap < tile:
        raise InputError(f"tile overlap {overlap} must be >= 0 and smaller than the tile size {tile}")
    height, width = x.shape[-2:]
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    out: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    for top in rows:
        for left in cols:
            piece = fn(x[..., top : top + tile, left : left + tile])
            th, tw = piece.shape[-2:]
            wy = _ramp(th, scale(overlap), top > 0, top + tile < height, piece)
            wx = _ramp(tw, scale(overlap), left > 0, left + tile < width, piece)
            weight = wy[:, None] * wx[None, :]
            if out is None:
                out = piece.new_zeros((*piece.shape[:-2], scale(height), scale(width)), dtype=torch.float32)
                weight_sum = torch.zeros(out.shape[-2:], dtype=torch.float32, device=piece.device)
            oy, ox = scale(top), scale(left)
            out[..., oy : oy + th, ox : ox + tw] += piece.float() * weight
            weight_sum[oy : oy + th, ox : ox + tw] += weight
    return (out / weight_sum).to(x.dtype)
