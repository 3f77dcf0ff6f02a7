"""``F.linear`` as a oneDNN 1x1 convolution on the CPU: the same products and sums, another library.

On the CPU without autograd (fp32 or bf16), where ``ldm.kernels.choice`` measured it faster, the rows are viewed as the pixels of a channels-last
(1, in, rows, 1) map (no copy) and multiplied by the weight as a 1x1 convolution: computed by
oneDNN instead of the BLAS GEMM behind ``F.linear``. On AMD CPUs with AVX-512, MKL's GEMM runs
its AVX2 code while oneDNN uses AVX-512 (registers of twice the width), so the convolution is
faster there; on AVX2-only CPUs the two libraries run at about the same rate, and on Intel CPUs, where MKL
runs AVX-512 code, the GEMM can be the faster. Elsewhere (autograd, GPUs, fp16) it is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` is fp32 or bf16 on the CPU with autograd off: where the oneDNN paths can run."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()


def as_pixels(rows: torch.Tensor) -> torch.Tensor:
    """(..., C) rows as the pixels of a (1, C, rows, 1) map: a view, channels-last for contiguous rows."""
    return rows.reshape(1, -1, 1, rows.shape[-1]).permute(0, 3, 1, 2)


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """A channels-last (1, C, rows, 1) map back as (rows, C) rows, without copying."""
    return pixels.permute(0, 2, 3, 1).reshape(-1, pixels.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, as_conv: bool) -> torch.Tensor:
    """``F.linear``; computed as a oneDNN 1x1 convolution where ``as_conv`` and ``cpu_inference(x)``."""
    if not (as_conv and cpu_inference(x)):
        return F.linear(x, weight, bias)
    return linear_as_conv(x, weight, bias)


def linear_as_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as a 1x1 convolution of ``x``'s rows viewed as pixels; contiguous rows,
    as ``F.linear`` returns.

    Rows that are a transposed view (the VAE's attention takes its tokens as one) would view as an NCHW map,
    and oneDNN would return the products column by column: a layout that torch's fused attention kernels
    refuse, falling back to a score matrix held whole (2 GiB at 1024x1024 pixels). So they are copied first.
    """
    out = F.conv2d(as_pixels(x.contiguous()), weight[:, :, None, None], bias)  # (1, out, rows, 1), channels-last
    return from_pixels(out).view(*x.shape[:-1], weight.shape[0])
