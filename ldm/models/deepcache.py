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

``DeepCacheUNet`` wraps a ``UNet`` for one generation (one denoising loop): make a fresh one per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.models.layers import join_skip
from ldm.models.unet import UNet, timestep_embedding


class DeepCacheUNet(nn.Module):
    """``UNet`` with the forward signature of ``UNet``, computing its deep part every ``interval`` calls.

    ``interval == 1`` runs every call in full and equals the plain U-Net exactly. A call whose
    text batch differs from the cached feature's (e.g. after guidance is dropped) runs in full.
    """

    def __init__(self, unet: UNet, interval: int, branch: int = 2):
        super().__init__()
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
        self.calls = 0
        self.full_calls = 0
        self._cached: torch.Tensor | None = None

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # The cached feature has the text's rows (the U-Net repeats shared samples at the cross-attention).
        stale = self._cached is None or self._cached.shape[0] != encoder_hidden_states.shape[0]
        full = self.calls % self.interval == 0 or stale
        self.calls += 1
        if full:
            self.full_calls += 1
        return self._run(sample, timestep, encoder_hidden_states, full)

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, context: torch.Tensor, full: bool) -> torch.Tensor:
        unet = self.unet
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        temb = unet.time_embedding(timestep_embedding(t, unet.config.block_out_channels[0]).to(sample.dtype))
        x = unet.conv_in(sample)
        skips = [x]
        resume = unet.config.layers_per_block + 1 - self.branch  # first up layer a cached step runs
        if full:
            for block in unet.down_blocks:
                x = block(x, temb, context, skips)
            x = unet.mid_block(x, temb, context)
            for block in unet.up_blocks[:-1]:
                x = block(x, temb, context, skips)
        else:
            first = unet.down_blocks[0]
            for i in range(self.branch - 1):
                x = _layer(first, i, x, temb, context)
                skips.append(x)
            x = self._cached
        last = unet.up_blocks[-1]
        for i in range(resume if not full else 0, len(last.resnets)):
            if full and i == resume:
                self._cached = x
            x = _layer(last, i, join_skip(x, skips), temb, context)
        return unet.conv_out(F.silu(unet.conv_norm_out(x)))


def _layer(block: nn.Module, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Layer ``i`` of a U-Net level: its ResNet, then its transformer if the level has them."""
    x = block.resnets[i](x, temb)
    if block.attentions is not None:
        x = block.attentions[i](x, context)
    return x
