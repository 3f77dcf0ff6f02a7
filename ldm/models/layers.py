"""Layers that the U-Net and the VAE share: the ResNet block, the 2x resamplers, the convolution
they use, and the batch sharing of guided U-Net calls (``repeat_rows``, ``join_skip``).

Module attributes are named after diffusers' checkpoint keys (``conv1``, ``time_emb_proj``,
``conv_shortcut``...), so released weights load with no renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def repeat_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its batch repeated to ``rows`` rows, as ``torch.cat([t] * (rows // len(t)))``.

    A U-Net given fewer samples than text embeddings shares each sample between several
    embeddings (classifier-free guidance feeds one latent to the unconditional and the
    conditional pass). Everything before the first cross-attention is the same for both, so it
    is computed once per sample and repeated here, where it meets the text.
    """
    return t if t.shape[0] == rows else t.repeat(rows // t.shape[0], *(1,) * (t.dim() - 1))


def join_skip(x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
    """``x`` with the last skip connection appended along the channels (popped from ``skips``); a skip made
    before the first cross-attention holds one row per shared sample and is repeated to ``x``'s rows."""
    return torch.cat([x, repeat_rows(skips.pop(), x.shape[0])], dim=1)


# oneDNN reorders a convolution's weights into its blocked layout on every call (eager PyTorch keeps no
# reordered copy), a transient copy as large as the weights: 59-118 MB for the U-Net's 1280-channel 3x3
# convs. On the 8x8 and 16x16 maps, where each call computes little, that dominated: on the benchmark CPU the
# same convolutions computed in slices of 320 output channels ran about 2x faster on 8x8 maps and 1.2x on
# 16x16 ones, and the transient copy shrank to a slice's. On 32x32 maps slicing is as fast (3 % faster for
# 1280 channels) and still bounds the copy; from 64x64 on it is slower.
SLICED_CONV_MAX_PIXELS = 32 * 32
SLICED_CONV_CHANNELS = 320


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same checkpoint keys); on the CPU without autograd, an output of at
    most ``SLICED_CONV_MAX_PIXELS`` pixels is computed in slices of ``SLICED_CONV_CHANNELS`` output channels
    (each output channel is its own sum, so the result is the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_pixels = ((x.shape[-2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1) * (
            (x.shape[-1] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        )
        if (
            x.device.type != "cpu"
            or torch.is_grad_enabled()
            or out_pixels > SLICED_CONV_MAX_PIXELS
            or self.out_channels <= SLICED_CONV_CHANNELS
        ):
            return super().forward(x)
        weights = self.weight.split(SLICED_CONV_CHANNELS)
        biases = self.bias.split(SLICED_CONV_CHANNELS) if self.bias is not None else [None] * len(weights)
        return torch.cat([F.conv2d(x, w, b, self.stride, self.padding) for w, b in zip(weights, biases)], dim=1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (diffusers' ``ResnetBlock2D``).

    Shared with the VAE, which has no time embedding (``temb_channels=None``).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # Without autograd every intermediate is ours alone: activate and add in place, and drop each map
        # as soon as the next exists, so at most three maps of this size are alive at once.
        inplace = not torch.is_grad_enabled()
        h = F.silu(self.norm1(x), inplace=inplace)
        h = self.conv1(h)
        if self.time_emb_proj is not None:
            shift = repeat_rows(self.time_emb_proj(F.silu(temb)), h.shape[0])[:, :, None, None]
            h = h.add_(shift) if inplace else h + shift
        h = F.silu(self.norm2(h), inplace=inplace)
        h = self.conv2(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut) if inplace else shortcut + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to an explicit size, for odd skip sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        doubled = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        # The sub-pixel form reads the conv's weight, so it runs only for a plain Conv2d. An unfused LoRA
        # wraps the conv in a peft layer (not an nn.Conv2d) whose update exists only in its forward.
        plain = isinstance(self.conv, nn.Conv2d)
        if plain and doubled and not torch.is_grad_enabled() and x.shape[-2] * x.shape[-1] >= SUBPIXEL_MIN_PIXELS:
            return upsample_conv(self.conv, x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# Measured on the 2-core benchmark CPU: the sub-pixel form is about 2x faster from 32x32 inputs on and
# slower at 8x8. At 16x16 it is 1.3x faster, but there the four 1280-channel kernel sets are 105 MB made
# per call, which raised a U-Net step's peak memory by 170 MiB for 37 ms; so 16x16 stays plain.
SUBPIXEL_MIN_PIXELS = 32 * 32


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(nearest-2x-upsample(x))`` as four 2x2 convolutions of x (see ``subpixel_kernels``)."""
    b, _, height, width = x.shape
    co = conv.out_channels
    kernels, bias = subpixel_kernels(conv)
    res = F.conv2d(x, kernels, bias, padding=1)  # (B, 4*co, height + 1, width + 1)
    out = x.new_empty(b, co, 2 * height, 2 * width)
    for phase in range(4):
        a, c = divmod(phase, 2)
        out[:, :, a::2, c::2] = res[:, phase * co : (phase + 1) * co, a : a + height, c : c + width]
    return out


def subpixel_kernels(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The (4*out, in, 2, 2) kernels (phase 2a+c: output row parity a, column parity c) and bias equal to
    ``conv`` applied after nearest 2x upsampling (the sub-pixel view of Shi et al. 2016, sec. 2.2).

    An output pixel of parity 0 sees source offsets (-1, 0) through kernel taps (0 | 1+2); parity 1 sees
    offsets (0, +1) through taps (0+1 | 2). Rows and columns combine independently.
    """
    w = conv.weight  # (out, in, 3, 3)

    def split(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        k0, k1, k2 = t.unbind(dim)
        return [torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)]

    phases = [col for row in split(w, 2) for col in split(row, 3)]  # 4 x (out, in, 2, 2)
    return torch.cat(phases), conv.bias.repeat(4)
