"""Speed-ups attached to the U-Net from outside: DeepCache (``deepcache``) and token merging (``tome``).

Each is a hook that the U-Net runs when a call passes it (``ldm.models.unet.UNetHooks``): token merging
computes the self-attention of chosen transformer blocks, DeepCache runs the block loop. The hooks
travel with the call and nothing is set on the network, so one shared U-Net serves concurrent
generations with different speed-ups. ``speed_up`` builds the network that a denoising loop calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.models.unet import ControlResiduals, UNet, UNetHooks
from ldm.speedups.deepcache import DeepCache
from ldm.speedups.tome import token_merging_hooks

Network = Callable[..., torch.Tensor]  # (sample, timestep, encoder_hidden_states, timestep_cond=None) -> output


class HookedUNet:
    """``unet`` called with the same ``hooks`` on every call: ``f(sample, timestep, encoder_hidden_states, timestep_cond=None)``."""

    def __init__(self, unet: UNet, hooks: UNetHooks):
        self.unet = unet
        self.hooks = hooks

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        residuals: ControlResiduals | None = None,
        **added: torch.Tensor,  # SDXL's text_embeds and time_ids
    ) -> torch.Tensor:
        return self.unet(
            sample, timestep, encoder_hidden_states, hooks=self.hooks, timestep_cond=timestep_cond, residuals=residuals, **added
        )


def speed_up(unet: UNet, deepcache_interval: int = 1, token_merging: float = 0.0) -> Network:
    """A per-call network ``f(sample, timestep, encoder_hidden_states) -> output``: ``unet`` with DeepCache every
    ``deepcache_interval`` calls and ``token_merging`` of the full-resolution self-attention tokens merged.

    Build one per generation (DeepCache's cache lives in it); ``unet`` is not modified. Returns the unet
    itself when both are off (interval 1, ratio 0). Out-of-range settings raise ``ConfigError``.
    """
    attention = token_merging_hooks(unet, token_merging)
    blocks = DeepCache(unet, deepcache_interval) if deepcache_interval != 1 else None
    if not attention and blocks is None:
        return unet
    return HookedUNet(unet, UNetHooks(self_attention=attention, blocks=blocks))


__all__ = ["DeepCache", "HookedUNet", "Network", "speed_up", "token_merging_hooks"]
