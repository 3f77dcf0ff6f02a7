"""The attention kernels against the textbook formula softmax(Q K^T / sqrt(d)) V."""

from __future__ import annotations

import pytest
import torch

from ldm.errors import ConfigError
from ldm.models.attention import (
    _KERNELS,
    Attention,
    BasicTransformerBlock,
    FeedForward,
    SpatialTransformer,
    VAEAttention,
    require_backend,
    set_attention,
)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Vaswani et al. 2017, eq. 1, per head, in float64."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("backend", ["sdpa", "sliced"])
@pytest.mark.parametrize(("heads", "queries", "keys"), [(1, 16, 16), (4, 37, 77), (8, 64, 5)])
def test_kernels_compute_scaled_dot_product_attention(backend, heads, queries, keys):
    g = torch.Generator().manual_seed(heads)
    attn = Attention(32, heads, context_dim=24)
    set_attention(attn, backend, slice_size=10 if backend == "sliced" else None)
    x = torch.randn(2, queries, 32, generator=g)
    context = torch.randn(2, keys, 24, generator=g)
    with torch.no_grad():
        got = attn(x, context)
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        expected = attn.to_out[0](_reference(q, k, v, heads).float())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "sliced"])
def test_upcast_computes_attention_of_bf16_inputs_to_fp32_accuracy(backend):
    g = torch.Generator().manual_seed(0)
    # Large logits, as in SD 2.1's deep layers: bf16 scores would lose most of their precision.
    q, k, v = (torch.randn(1, 50, 64, generator=g) * s for s in (8.0, 8.0, 1.0))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    expected = _reference(q, k, v, 2).float()  # exact attention of the same bf16 inputs
    upcast = _KERNELS[backend](q, k, v, 2, True, 16)
    assert upcast.dtype == torch.bfloat16
    upcast_err = ((upcast.float() - expected).norm() / expected.norm()).item()
    assert upcast_err < 3e-3  # only the final rounding to bf16 (eps 2^-8) remains
    if backend == "sliced":  # our own kernel: without upcast its bf16 scores are measurably worse
        plain = _KERNELS[backend](q, k, v, 2, False, 16)
        assert ((plain.float() - expected).norm() / expected.norm()).item() > 5 * upcast_err


def test_vae_attention_is_residual_single_head_attention_over_pixels():
    g = torch.Generator().manual_seed(1)
    block = VAEAttention(32, groups=8)
    x = torch.randn(2, 32, 5, 3, generator=g)
    with torch.no_grad():
        got = block(x)
        tokens = block.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = block.to_q(tokens), block.to_k(tokens), block.to_v(tokens)
        out = block.to_out[0](_reference(q, k, v, 1).float())
        expected = out.transpose(1, 2).reshape(2, 32, 5, 3) + x
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous()


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_projection_variants_have_diffusers_keys(linear):
    block = SpatialTransformer(64, 8, context_dim=32, groups=32, use_linear_projection=linear, upcast=False)
    keys = set(block.state_dict())
    for key in ["norm.weight", "proj_in.weight", "proj_out.bias", "transformer_blocks.0.attn1.to_q.weight",
                "transformer_blocks.0.attn2.to_k.weight", "transformer_blocks.0.attn2.to_out.0.bias",
                "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.ff.net.2.weight",
                "transformer_blocks.0.norm3.weight"]:  # fmt: skip
        assert key in keys
    assert block.proj_in.weight.ndim == (2 if linear else 4)
    assert "transformer_blocks.0.attn1.to_q.bias" not in keys
    assert block.transformer_blocks[0].attn2.to_k.weight.shape == (64, 32)
    x = torch.randn(1, 64, 3, 5)
    with torch.no_grad():
        out = block(x, torch.randn(1, 7, 32))
    assert out.shape == x.shape
    # NCHW out: a channels-last result would make every following conv slower.
    assert out.is_contiguous()


def test_transformer_block_is_three_residual_sublayers():
    block = BasicTransformerBlock(16, 2, context_dim=8, upcast=False)
    x, context = torch.randn(1, 6, 16), torch.randn(1, 4, 8)
    with torch.no_grad():
        h = block.attn1(block.norm1(x)) + x
        h = block.attn2(block.norm2(h), context) + h
        value, gate = block.ff.net[0].proj(block.norm3(h)).chunk(2, dim=-1)
        expected = block.ff.net[2](value * torch.nn.functional.gelu(gate)) + h
        torch.testing.assert_close(block(x, context), expected)


def test_backend_validation():
    assert require_backend("sliced", None) > 0
    assert require_backend("sliced", 3) == 3
    with pytest.raises(ConfigError, match="choose one of sdpa, xformers, sliced"):
        require_backend("math", None)


def test_feed_forward_without_autograd_runs_in_token_chunks_with_the_same_result(monkeypatch):
    import ldm.models.attention as attention

    torch.manual_seed(4)
    ff = FeedForward(16).eval()
    x = torch.randn(2, 7, 16)
    exact = ff(x)  # autograd on: one pass over all 14 tokens
    calls = []
    ff.net[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    monkeypatch.setattr(attention, "FF_CHUNK_ROWS", 4)
    with torch.no_grad():
        chunked = ff(x)
    assert calls == [4, 4, 4, 2]  # 14 tokens of both images, 4 at a time
    assert chunked.shape == x.shape
    torch.testing.assert_close(chunked, exact, rtol=1e-6, atol=1e-6)
