"""Long self-attention on the CPU as two oneDNN 1x1 convolutions per head and chunk of queries.

softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), in fp32 or bf16 without autograd, where the
sequence is long enough (``conv_attention_rows``) and ``ldm.kernels.choice`` measured it faster; elsewhere
the caller runs torch's fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.kernels.linear import as_pixels, cpu_inference, from_pixels

# Attention as convolutions (see attention_as_convolutions): scores held per chunk of queries,
# and the fewest query rows per chunk and keys for which it is used.
CONV_ATTENTION_SCORES = 1 << 22  # 16 MiB of fp32 scores: stays in the CPU's last-level cache
CONV_ATTENTION_MIN_ROWS = 768


def conv_attention_rows(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query rows per chunk for ``attention_as_convolutions``, or 0 where the fused SDPA kernel runs."""
    if not cpu_inference(q):
        return 0
    queries, keys = q.shape[1], k.shape[1]
    most = CONV_ATTENTION_SCORES // keys  # query rows whose scores fit in a chunk
    if keys < CONV_ATTENTION_MIN_ROWS or most < CONV_ATTENTION_MIN_ROWS:
        return 0
    chunks = -(-queries // most)
    rows = -(-queries // chunks)  # chunks of equal size: no short last chunk on oneDNN's slower kernel
    return rows if rows >= CONV_ATTENTION_MIN_ROWS else 0


def attention_as_convolutions(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, rows: int
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1) as two oneDNN 1x1 convolutions per head.

    For each head and chunk of ``rows`` queries: the queries, as the pixels of a (1, d, rows, 1) map,
    are convolved with K / sqrt(d) as a (keys, d, 1, 1) weight, which gives the scaled scores as a
    channels-last map, that is a (rows, keys) matrix; the softmax runs in place over each row;
    the probabilities, as a (1, keys, rows, 1) map, are convolved with V^T as a (d, keys, 1, 1)
    weight, which gives P V. Each row's softmax is independent, so the chunks are exact.

    Why: torch's fused CPU attention multiplies its small blocks with the BLAS GEMM, which on AMD
    CPUs with AVX-512 runs AVX2 code at half of oneDNN's AVX-512 rate, and a head width of 40 (SD 1.5)
    makes those products short; at 4096 tokens (SD 1.5 at 512x512) a layer measured clearly faster
    this way on one AMD EPYC, and half as fast on another, whose fused kernel is faster: so it runs only
    where ``ldm.kernels.choice`` measured it faster. oneDNN picks a slower kernel below about 768 query rows
    and the scores of a chunk are kept within the cache (``CONV_ATTENTION_SCORES``), so longer
    sequences (more than 5461 keys) and short ones keep the fused kernel (``conv_attention_rows``).
    """
    batch, queries, width = q.shape
    keys, d = k.shape[1], width // heads
    out = q.new_empty(q.shape)
    # V^T gets zero rows up to a multiple of 16 output channels (one AVX-512 register of fp32): oneDNN
    # computes whole registers faster than a ragged last one (48 output channels faster than 40).
    v_weight = q.new_zeros(-(-d // 16) * 16, keys, 1, 1)
    for i in range(batch):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            k_weight = (k[i, :, cols] * d**-0.5).view(keys, d, 1, 1)  # the scale 1/sqrt(d) applied to K
            v_weight[:d, :, 0, 0] = v[i, :, cols].t()
            for start in range(0, queries, rows):
                # Contiguous query rows make a channels-last map, so oneDNN writes the scores row by row
                # (the VAE's queries are a transposed view, which gave column-major scores).
                chunk = q[i, start : start + rows, cols].contiguous()
                scores = from_pixels(F.conv2d(as_pixels(chunk), k_weight))
                # In place: the (rows, keys) scores are the largest buffer here. torch.softmax's CPU kernel
                # reads each row's maximum, then writes exp(x - max) and scales it, element by element.
                torch._softmax(scores, -1, False, out=scores)
                out[i, start : start + rows, cols] = from_pixels(F.conv2d(as_pixels(scores), v_weight))[:, :d]
    return out
