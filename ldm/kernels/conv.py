"""Convolutions on the CPU: small maps in output-channel slices, and nearest-2x upsampling followed by a
3x3 convolution as four 2x2 sub-pixel convolutions. Both give the plain convolution's result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN reorders a convolution's weights into its blocked layout on every call (eager PyTorch keeps no
# reordered copy), a transient copy as large as the weights (the U-Net's 1280-channel 3x3 convs are the
# largest). On small maps, where each call computes little, that copy dominates the call; computed in slices
# of output channels, each call reorders and holds only a slice's weights. Up to 32x32 output maps slicing
# measured faster or as fast, and it bounds the copy; on larger maps it is slower (figures: benchmarks/).
SLICED_CONV_MAX_PIXELS = 32 * 32
SLICED_CONV_CHANNELS = 320

# The sub-pixel form does 4/9 of the plain multiplications but makes its four kernel sets (16/9 of the
# conv's weights) on every call. From 32x32 inputs on it measured faster; on small maps it is slower, and at
# 16x16 the little time it saved cost a U-Net step's peak memory those kernel sets; so 16x16 stays plain.
SUBPIXEL_MIN_PIXELS = 32 * 32


def use_sliced_conv(
    x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> bool:
    """Whether ``F.conv2d(x, weight, ...)`` runs in output-channel slices (``conv2d_in_slices``): on the CPU
    without autograd, for an output of at most ``SLICED_CONV_MAX_PIXELS`` pixels and more than
    ``SLICED_CONV_CHANNELS`` channels."""
    kernel = weight.shape[-2:]
    out_pixels = ((x.shape[-2] + 2 * padding[0] - kernel[0]) // stride[0] + 1) * (
        (x.shape[-1] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    )
    return not (
        x.device.type != "cpu"
        or torch.is_grad_enabled()
        or out_pixels > SLICED_CONV_MAX_PIXELS
        or weight.shape[0] <= SLICED_CONV_CHANNELS
    )


def conv2d_in_slices(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """``F.conv2d`` in slices of ``SLICED_CONV_CHANNELS`` output channels (each output channel is its own
    sum, so the result is the same)."""
    weights = weight.split(SLICED_CONV_CHANNELS)
    biases = bias.split(SLICED_CONV_CHANNELS) if bias is not None else [None] * len(weights)
    return torch.cat([F.conv2d(x, w, b, stride, padding) for w, b in zip(weights, biases)], dim=1)


def use_subpixel_upsample(x: torch.Tensor) -> bool:
    """Whether nearest-2x upsampling of ``x`` and a 3x3 conv run as ``upsample_conv``: without autograd, from
    ``SUBPIXEL_MIN_PIXELS`` input pixels on."""
    return not torch.is_grad_enabled() and x.shape[-2] * x.shape[-1] >= SUBPIXEL_MIN_PIXELS


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 3x3, padding-1 conv of nearest-2x-upsampled x, as four 2x2 convolutions of x (``subpixel_kernels``)."""
    b, _, height, width = x.shape
    co = weight.shape[0]
    kernels, bias = subpixel_kernels(weight, bias)
    res = F.conv2d(x, kernels, bias, padding=1)  # (B, 4*co, height + 1, width + 1)
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty(b, co, 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=layout)
    for phase in range(4):
        a, c = divmod(phase, 2)
        out[:, :, a::2, c::2] = res[:, phase * co : (phase + 1) * co, a : a + height, c : c + width]
    return out


def subpixel_kernels(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (4*out, in, 2, 2) kernels (phase 2a+c: output row parity a, column parity c) and bias equal to
    a 3x3 conv of ``weight`` and ``bias`` applied after nearest 2x upsampling (the sub-pixel view of
    Shi et al. 2016, sec. 2.2).

    An output pixel of parity 0 sees source offsets (-1, 0) through kernel taps (0 | 1+2); parity 1 sees
    offsets (0, +1) through taps (0+1 | 2). Rows and columns combine independently.
    """
    w = weight  # (out, in, 3, 3)

    def split(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        k0, k1, k2 = t.unbind(dim)
        return [torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)]

    phases = [col for row in split(w, 2) for col in split(row, 3)]  # 4 x (out, in, 2, 2)
    return torch.cat(phases), bias.repeat(4)
