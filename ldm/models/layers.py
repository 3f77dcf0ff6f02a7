"""Layers that the U-Net and the VAE share: the ResNet block, the 2x resamplers, the convolution
they use, and the batch sharing of guided U-Net calls (``repeat_rows``, ``join_skip``).

Module attributes are named after diffusers' checkpoint keys (``conv1``, ``time_emb_proj``,
``conv_shortcut``...), so released weights load with no renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.choice import PLAIN, KernelChoice
from ldm.kernels.conv import conv2d_in_slices, upsample_conv, use_sliced_conv, use_subpixel_upsample


def repeat_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its batch repeated to ``rows`` rows, as ``torch.cat([t] * (rows // len(t)))``.

    A U-Net given fewer samples than text embeddings shares each sample between several
    embeddings (classifier-free guidance feeds one latent to the unconditional and the
    conditional pass). Everything before the first cross-attention is the same for both, so it
    is computed once per sample and repeated here, where it meets the text.
    """
    # torch.cat keeps a channels-last map channels-last, where Tensor.repeat would return it in NCHW (and the
    # next GroupNorm and convolution would then run in NCHW or convert it back).
    return t if t.shape[0] == rows else torch.cat([t] * (rows // t.shape[0]))


def join_skip(x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
    """``x`` with the last skip connection appended along the channels (popped from ``skips``); a skip made
    before the first cross-attention holds one row per shared sample and is repeated to ``x``'s rows."""
    return torch.cat([x, repeat_rows(skips.pop(), x.shape[0])], dim=1)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same checkpoint keys); on the CPU without autograd, where ``kernels``
    takes it, a small output map of many channels is computed in output-channel slices (``ldm.kernels.conv``),
    with the same result."""

    kernels: KernelChoice = PLAIN  # set per network by set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernels.sliced_conv and use_sliced_conv(x, self.weight, self.stride, self.padding)):
            return super().forward(x)
        return conv2d_in_slices(x, self.weight, self.bias, self.stride, self.padding)


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
    """Nearest-neighbour 2x (or to an explicit size, for odd skip sizes) then a 3x3 conv; as sub-pixel
    convolutions where ``kernels`` takes it (``ldm.kernels.conv``)."""

    kernels: KernelChoice = PLAIN  # set per network by set_kernels

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        doubled = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        # The sub-pixel form reads the conv's weight, so it runs only for a plain Conv2d. An unfused LoRA
        # wraps the conv in a peft layer (not an nn.Conv2d) whose update exists only in its forward.
        plain = isinstance(self.conv, nn.Conv2d)
        if plain and doubled and self.kernels.subpixel_upsample and use_subpixel_upsample(x):
            return upsample_conv(x, self.conv.weight, self.conv.bias)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
