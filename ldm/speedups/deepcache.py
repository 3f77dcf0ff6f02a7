"""DeepCache: reuse the U-Net's deep features across neighbouring denoising steps.

Ma, Fang & Wang 2023, "DeepCache: Accelerating Diffusion Models for Free" (sec. 3.2-3.3): the
high-level features that the up path delivers to the shallowest skip branch change little from
one step to the next, so they are computed in full only every ``interval`` steps ("1:N uniform"
strategy, sec. 3.3) and reused in between. A cached step runs only the shallow part of the
network: ``conv_in``, the first ``branch - 1`` layers (ResNet [+ transformer]) of the first down
level, then, starting from the cached feature, the last ``branch`` layers of the last up level
and the output head.

Skip numbering: skip 0 is ``conv_in``'s output, skip j (1 <= j <= layers_per_block) is the output of
layer j - 1 of the first down level. Up-level layer i of the last up level consumes skip
``layers_per_block - i``, so a cached step that recomputes skips 0..branch-1 resumes the up path at
layer ``layers_per_block + 1 - branch`` with the feature cached there. ``branch = 2`` is the paper's
setting for Stable Diffusion (cache layer 0 of block 0).

``DeepCache`` is the block loop of the U-Net's calls during one generation (``UNetHooks.blocks``):
the U-Net still checks the batch, embeds the time and runs the output head, and DeepCache runs its
blocks and layers. It holds the cache, so make a fresh one per denoising loop.
"""

from __future__ import annotations

import torch

from ldm.errors import ConfigError
from ldm.models.unet import UNet, UNetHooks


class DeepCache:
    """A ``BlockLoop`` that runs the U-Net's deep part every ``interval`` calls and reuses its feature in between.

    ``interval == 1`` runs every call in full and equals the plain U-Net exactly. A call whose
    text batch differs from the cached feature's (e.g. after guidance is dropped) runs in full.
    ``calls`` and ``full_calls`` count the calls made and those run in full.
    """

    def __init__(self, unet: UNet, interval: int, branch: int = 2):
        levels = unet.config.layers_per_block + 1
        if interval < 1:
            raise ConfigError(f"DeepCache interval must be at least 1 (1 = no caching), got {interval}")
        if not 1 <= branch <= levels:
            raise ConfigError(f"DeepCache branch must be between 1 and {levels} for this U-Net, got {branch}")
        if unet.up_blocks[-1].upsamplers is not None:
            raise ConfigError("DeepCache needs a U-Net whose last up level has no upsampler")
        self.unet = unet
        self.interval = interval
        self.branch = branch
        self.resume = levels - branch  # the first layer of the last up level that a cached call runs
        self.calls = 0
        self.full_calls = 0
        self._cached: torch.Tensor | None = None

    def __call__(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor], hooks: UNetHooks
    ) -> torch.Tensor:
        # The cached feature has the text's rows (the U-Net repeats shared samples at the cross-attention).
        stale = self._cached is None or self._cached.shape[0] != context.shape[0]
        full = self.calls % self.interval == 0 or stale
        self.calls += 1
        if full:
            self.full_calls += 1
            self._cached = self._deep(x, temb, context, skips, hooks)
        else:
            self._shallow_skips(x, temb, context, skips, hooks)
        return self._last_layers(self._cached, temb, context, skips, hooks)

    def _deep(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor], hooks: UNetHooks
    ) -> torch.Tensor:
        """The full pass up to the feature that enters layer ``resume`` of the last up level (the one cached)."""
        unet, attention = self.unet, hooks.self_attention
        for block in unet.down_blocks:
            x = block(x, temb, context, skips, attention)
        x = unet.mid_block(x, temb, context, attention)
        for block in unet.up_blocks[:-1]:
            x = block(x, temb, context, skips, attention)
        for i in range(self.resume):
            x = unet.up_blocks[-1].layer(i, x, temb, context, skips, attention)
        return x

    def _shallow_skips(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor], hooks: UNetHooks
    ) -> None:
        """Push the skips that the last up level's layers from ``resume`` on consume: the first ``branch - 1``
        layers of the first down level (skip 0, ``conv_in``'s output, is already there)."""
        first = self.unet.down_blocks[0]
        for i in range(self.branch - 1):
            x = first.layer(i, x, temb, context, hooks.self_attention)
            skips.append(x)

    def _last_layers(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor], hooks: UNetHooks
    ) -> torch.Tensor:
        last = self.unet.up_blocks[-1]
        for i in range(self.resume, len(last.resnets)):
            x = last.layer(i, x, temb, context, skips, hooks.self_attention)
        return x
