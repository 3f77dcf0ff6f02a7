"""Attention for the U-Net and the VAE, with one switch for the kernel that computes it.

Scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need", eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

computed per head. Three kernels compute the same function (``AttentionBackend``):

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
  flash / memory-efficient kernel where the device has one. The default. On the CPU without
  autograd, long self-attention runs instead as two 1x1 convolutions per head and chunk of
  queries (``ldm.kernels.attention``) where the network's ``KernelChoice`` takes that path
  (measured per CPU, ``ldm.kernels.choice``; ``set_kernels``).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (only when xformers is installed;
  useful on older CUDA builds of torch whose SDPA lacks a memory-efficient kernel).
- ``"sliced"``: plain matmul + softmax over chunks of ``slice_size`` query rows, so the
  score matrix held at once is (batch, heads, slice_size, keys) instead of
  (batch, heads, queries, keys). Exact (each row's softmax is independent), slower, bounded memory.

``upcast`` computes Q K^T and the softmax in fp32 (SD 2.1 overflows in fp16 otherwise).
Module attribute names follow diffusers' checkpoint keys (``to_q``, ``to_out.0``, ``ff.net.0.proj``...),
so released weights load with no renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.kernels.attention import attention_as_convolutions, conv_attention_rows
from ldm.kernels.choice import PLAIN, KernelChoice
from ldm.kernels.linear import linear
from ldm.models.layers import Conv2d, Upsample, repeat_rows

AttentionBackend = Literal["sdpa", "xformers", "sliced"]

DEFAULT_SLICE_SIZE = 1024  # query rows per chunk for "sliced" when none is given
FF_CHUNK_ROWS = 2048  # tokens per feed-forward chunk without autograd (see FeedForward.forward)

SelfAttention = Callable[[torch.Tensor], torch.Tensor]  # a block's own self-attention: (B, N, C) -> (B, N, C)


class SelfAttentionHook(Protocol):
    """Computes a transformer block's self-attention for one call, in place of ``attend(hidden)``.

    ``hidden``: the normed tokens (B, H*W, C) of an H x W map, ``size`` = (H, W); ``attend`` is the block's
    own self-attention, which the hook may call on other tokens (fewer, say).
    """

    def __call__(self, hidden: torch.Tensor, size: tuple[int, int], attend: SelfAttention) -> torch.Tensor: ...


# One call's self-attention hooks, keyed by the BasicTransformerBlock they apply to: passed down with the
# call and never stored on a module, so concurrent calls on one shared network do not see each other's.
SelfAttentionHooks = Mapping[nn.Module, SelfAttentionHook]
NO_HOOKS: SelfAttentionHooks = MappingProxyType({})


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint keys) that runs as a 1x1 convolution on the CPU
    without autograd where ``kernels`` takes it (``ldm.kernels.linear``); elsewhere it is ``F.linear``."""

    kernels: KernelChoice = PLAIN  # set per network by set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.kernels.linear_as_conv)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool, slice_size: int) -> torch.Tensor:
    # q: (B, N, H*d), k/v: (B, M, H*d) -> views (B, H, N, d) without copying
    b, n, c = q.shape
    d = c // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    v = v.view(b, -1, heads, d).transpose(1, 2)
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
    return out.to(dtype).transpose(1, 2).reshape(b, n, c)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool, slice_size: int) -> torch.Tensor:
    import xformers.ops  # checked by require_backend before any module is switched to xformers

    # xformers takes (B, N, H, d) directly: plain views, no transposes.
    b, n, c = q.shape
    d = c // heads
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    out = xformers.ops.memory_efficient_attention(
        q.view(b, n, heads, d), k.view(b, -1, heads, d), v.view(b, -1, heads, d)
    )  # (B, N, H, d)
    return out.to(dtype).reshape(b, n, c)


def _sliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool, slice_size: int) -> torch.Tensor:
    b, n, c = q.shape
    d = c // heads
    q = q.view(b, n, heads, d).transpose(1, 2)  # (B, H, N, d)
    k_t = k.view(b, -1, heads, d).permute(0, 2, 3, 1)  # (B, H, d, M)
    v = v.view(b, -1, heads, d).transpose(1, 2)  # (B, H, M, d)
    score_dtype = torch.float32 if upcast else q.dtype
    k_t = k_t.to(score_dtype)
    scale = 1.0 / math.sqrt(d)
    out = q.new_empty(b, heads, n, d)
    for start in range(0, n, slice_size):
        rows = q[:, :, start : start + slice_size].to(score_dtype)
        scores = torch.matmul(rows * scale, k_t)  # (B, H, slice, M)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out[:, :, start : start + slice_size] = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(b, n, c)


_KERNELS = {"sdpa": _sdpa, "xformers": _xformers, "sliced": _sliced}


def _attend(layer: Attention | VAEAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool):
    """``layer``'s attention kernel on q, k, v (B, N, heads*d); long self-attention as convolutions where
    the layer's ``kernels`` take that path (in place of ``"sdpa"``, and not where fp32 scores are asked of bf16)."""
    as_conv = layer.backend == "sdpa" and layer.kernels.attention_as_conv and not (upcast and q.dtype != torch.float32)
    rows = conv_attention_rows(q, k) if as_conv else 0
    if rows:
        return attention_as_convolutions(q, k, v, heads, rows)
    return _KERNELS[layer.backend](q, k, v, heads, upcast, layer.slice_size)


def require_backend(backend: str, slice_size: int | None) -> int:
    """Check that ``backend`` can run here; return the slice size to use."""
    if backend not in _KERNELS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {', '.join(_KERNELS)}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            raise ConfigError(
                "attention backend 'xformers' needs the xformers package; install it or use 'sdpa'"
            ) from None
    if slice_size is not None and (backend != "sliced" or slice_size < 1):
        raise ConfigError(f"slice_size={slice_size} is only valid (>= 1) with attention backend 'sliced'")
    return slice_size or DEFAULT_SLICE_SIZE


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context`` is None, cross-attention otherwise."""

    kernels: KernelChoice = PLAIN  # set per network by set_kernels

    def __init__(
        self,
        query_dim: int,
        heads: int,
        context_dim: int | None = None,
        upcast: bool = False,
    ):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.backend: AttentionBackend = "sdpa"
        self.slice_size = DEFAULT_SLICE_SIZE
        self.to_q = Linear(query_dim, query_dim, bias=False)
        self.to_k = Linear(context_dim, query_dim, bias=False)
        self.to_v = Linear(context_dim, query_dim, bias=False)
        # diffusers keeps a dropout at to_out.1; it has no weights, so a one-element list keeps the key "to_out.0".
        self.to_out = nn.ModuleList([Linear(query_dim, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim)
        context = x if context is None else context
        out = _attend(self, self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The split product below reads the projection's weight, so it runs only for a plain Linear. An
        # unfused LoRA wraps the projection in a peft layer (not an nn.Linear) whose update exists only
        # in its forward: the projection must then be called as a module.
        if torch.is_grad_enabled() or not isinstance(self.proj, nn.Linear):
            value, gate = self.proj(x).chunk(2, dim=-1)
            return value * F.gelu(gate)
        # Without autograd the gate's and the value's halves of the projection are two products, and
        # the GELU and the gating run in place. Each buffer is half the projection's output, small enough
        # for the C allocator to reuse its memory rather than map fresh pages every call (far fewer page
        # faults in a 512x512 U-Net step, and a faster step). The same bits as the formula above.
        value_weight, gate_weight = self.proj.weight.chunk(2)
        value_bias, gate_bias = (None, None) if self.proj.bias is None else self.proj.bias.chunk(2)
        as_conv = self.proj.kernels.linear_as_conv
        gate = torch.ops.aten.gelu_(linear(x, gate_weight, gate_bias, as_conv))
        return gate.mul_(linear(x, value_weight, value_bias, as_conv))


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU hidden layer of 4x the width."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Position 1 is diffusers' dropout (p=0); an Identity keeps the output layer at key "net.2".
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() or rows.shape[0] <= FF_CHUNK_ROWS:
            return self.net[2](self.net[0](x))
        # Without autograd the 8x-wide GEGLU hidden layer exists for one chunk of tokens at a time:
        # for all tokens at 64x64 latents it is the largest transient of a U-Net step, so chunking
        # lowers the step's peak memory. Each token's result is the same.
        out = torch.cat([self.net[2](self.net[0](chunk)) for chunk in rows.split(FF_CHUNK_ROWS)])
        return out.view(*x.shape[:-1], out.shape[-1])


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        size: tuple[int, int] | None = None,
        hooks: SelfAttentionHooks = NO_HOOKS,
    ) -> torch.Tensor:
        # x: (B, H*W, dim) tokens of an H x W map, ``size`` = (H, W) (needed only by a self-attention hook)
        h = self.norm1(x)
        hook = hooks.get(self)
        if hook is None or size is None:
            x = self.attn1(h) + x
        else:
            x = hook(h, size, self.attn1) + x
        x = repeat_rows(x, context.shape[0])
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Text conditioning of a feature map (Rombach et al. 2022, sec. 3.3): diffusers' ``Transformer2DModel``.

    The map is normalized, projected, flattened to H*W tokens, passed through ``depth``
    ``BasicTransformerBlock``s (one in SD 1.x / 2.x, up to 10 in SDXL) and added back. SD 1.x projects
    with 1x1 convolutions, SD 2.x and SDXL with linear layers (``use_linear_projection``); the two differ
    only in weight shape.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        groups: int,
        use_linear_projection: bool,
        upcast: bool,
        depth: int = 1,
    ):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = Linear(channels, channels)
            self.proj_out = Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, upcast) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, hooks: SelfAttentionHooks = NO_HOOKS) -> torch.Tensor:
        # x: (B, C, H, W), context: (B, M, context_dim)
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        else:
            tokens = self.proj_in(tokens).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w), hooks)
        b = tokens.shape[0]  # the text's batch: shared samples were repeated at the cross-attention
        if self.use_linear_projection:
            out = self.proj_out(tokens).view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            out = self.proj_out(tokens.view(b, h, w, c).permute(0, 3, 1, 2))
        # ``out`` is a channels-last view; ``x`` first makes the sum contiguous (NCHW) in the same pass,
        # instead of a separate copy, and keeps channels-last layout from spreading to the next convs.
        return repeat_rows(x, out.shape[0]) + out


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, in the VAE's middle block (residual)."""

    kernels: KernelChoice = PLAIN  # set per network by set_kernels

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])
        self.backend: AttentionBackend = "sdpa"
        self.slice_size = DEFAULT_SLICE_SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> tokens (B, HW, C); one head of width C
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        # The original LDM attention block computes its softmax in fp32, hence upcast=True.
        out = _attend(self, self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), 1, True)
        out = self.to_out[0](out)  # (B, HW, C)
        return x + out.transpose(1, 2).view(b, c, h, w)  # strided view; the add writes NCHW


def set_attention(model: nn.Module, backend: AttentionBackend, slice_size: int | None = None) -> None:
    """Switch every attention layer in ``model`` to ``backend``."""
    slice_size = require_backend(backend, slice_size)
    for module in model.modules():
        if isinstance(module, (Attention, VAEAttention)):
            module.backend = backend
            module.slice_size = slice_size


KERNEL_USERS = (Linear, Attention, VAEAttention, Conv2d, Upsample)  # the layers with a ``kernels`` choice


def set_kernels(model: nn.Module, kernels: KernelChoice) -> None:
    """Let every layer of ``model`` take the fast paths of ``kernels`` (see ``ldm.kernels.choice``)."""
    for module in model.modules():
        if isinstance(module, KERNEL_USERS):
            module.kernels = kernels
