"""Token merging in the U-Net's self-attention (ToMe for Stable Diffusion).

Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion" (sec. 3-4), after Bolya et al.
2023, "Token Merging: Your ViT But Faster" (sec. 3, bipartite soft matching): before a
self-attention layer, the H*W tokens are split into destinations, one per 2x2 window of the
feature map (its top-left token), and sources, all the others. Each source finds its most similar
destination (cosine similarity of the normalized hidden states); the ``r = ratio * H*W`` sources
with the highest similarity are averaged into their destination. Attention runs on the
``H*W - r`` remaining tokens, and afterwards every merged source takes its destination's output
("unmerging", sec. 3.2), so the block's output has all H*W tokens again.

Self-attention costs O((H*W)^2), so merging half the tokens removes about 3/4 of its score and
value products; the gain grows with the image size. Merging is applied only to the transformer
blocks of the first ``levels`` resolution levels (the paper's ``max_downsample``: the full-resolution
level by default), where the tokens are most numerous and most redundant. ``ratio = 0`` is exact.

Merging is attached per call, as a self-attention hook of the transformer blocks it applies to
(``token_merging_hooks``, passed in ``UNetHooks.self_attention``): the shared U-Net is never changed.

Destinations are at a fixed position of every window, so the result is deterministic (the paper
draws the position at random per step to avoid grid artifacts; we prefer reproducible images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.errors import ConfigError
from ldm.models.attention import BasicTransformerBlock, SelfAttention, SelfAttentionHooks
from ldm.models.unet import UNet

Merge = Callable[[torch.Tensor], torch.Tensor]

MAX_RATIO = 0.75  # at most every source token of a 2x2 window is merged


def _partition(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices of (sources, destinations): the top-left token of every full 2x2 window is a destination."""
    is_dst = torch.zeros(height, width, dtype=torch.bool, device=device)
    is_dst[: height - height % 2 : 2, : width - width % 2 : 2] = True
    flat = is_dst.flatten()
    return (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)


def bipartite_soft_matching(x: torch.Tensor, size: tuple[int, int], ratio: float) -> tuple[Merge, Merge]:
    """(merge, unmerge) functions for the tokens ``x`` (B, H*W, C) of an H x W map (Bolya et al. 2023, sec. 3).

    ``merge`` maps (B, H*W, C') -> (B, H*W - r, C') and ``unmerge`` maps back, for any feature width C'.
    """
    batch, tokens, _ = x.shape
    src, dst = _partition(*size, x.device)
    r = min(int(tokens * ratio), src.numel())
    if r <= 0:
        return _identity, _identity
    metric = x / x.norm(dim=-1, keepdim=True)
    scores = metric[:, src] @ metric[:, dst].transpose(1, 2)  # (B, sources, destinations)
    best, best_dst = scores.max(dim=-1)  # each source's most similar destination
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # positions in the source list
    merged_dst = best_dst.gather(1, merged)  # (B, r): the destination each merged source joins

    def expand(index: torch.Tensor, width: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, width)

    def merge(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[-1]
        t_src, t_dst = t[:, src], t[:, dst]
        moved = t_src.gather(1, expand(merged, c))
        # Averaging (ToMe's size-weighted mean with unit sizes): dst = (dst + sum of its sources) / (1 + count).
        t_dst = t_dst.scatter_reduce(1, expand(merged_dst, c), moved, reduce="mean", include_self=True)
        return torch.cat([t_src.gather(1, expand(kept, c)), t_dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[-1]
        n_kept = kept.shape[1]
        t_kept, t_dst = t[:, :n_kept], t[:, n_kept:]
        t_src = t.new_empty(batch, src.numel(), c)
        t_src.scatter_(1, expand(kept, c), t_kept)
        t_src.scatter_(1, expand(merged, c), t_dst.gather(1, expand(merged_dst, c)))
        out = t.new_empty(batch, tokens, c)
        out[:, src] = t_src
        out[:, dst] = t_dst
        return out

    return merge, unmerge


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class MergeTokens:
    """Self-attention hook (``ldm.models.attention.SelfAttentionHook``): attention on the tokens left after
    merging ``ratio`` of them, every merged token then taking its destination's output (sec. 3.2)."""

    ratio: float

    def __call__(self, hidden: torch.Tensor, size: tuple[int, int], attend: SelfAttention) -> torch.Tensor:
        merge, unmerge = bipartite_soft_matching(hidden, size, self.ratio)
        return unmerge(attend(merge(hidden)))


def token_merging_hooks(unet: UNet, ratio: float, levels: int = 1) -> SelfAttentionHooks:
    """Self-attention hooks that merge ``ratio`` of the tokens in the first ``levels`` resolution levels of ``unet``.

    They apply to the transformer blocks of down level i and of the up level that mirrors it, for
    i < ``levels``; ``ratio = 0`` gives no hooks. Pass them with a call as ``UNetHooks.self_attention``.
    """
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ConfigError(f"token merging ratio must be between 0 and {MAX_RATIO}, got {ratio}")
    depth = len(unet.down_blocks)
    if not 1 <= levels <= depth:
        raise ConfigError(f"token merging levels must be between 1 and {depth} for this U-Net, got {levels}")
    if ratio == 0:
        return {}
    hook = MergeTokens(ratio)
    chosen = (*unet.down_blocks[:levels], *unet.up_blocks[depth - levels :])
    return {module: hook for level in chosen for module in level.modules() if isinstance(module, BasicTransformerBlock)}
