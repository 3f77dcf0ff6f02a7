"""Transition shim: ``ldm.pipeline`` still imports DeepCache from here. It now lives in ``ldm.speedups``;
this file goes once the pipeline builds its network with ``ldm.speedups.speed_up``."""

from __future__ import annotations

from torch import nn


def DeepCacheUNet(unet: nn.Module, interval: int):  # noqa: N802 (the old class's name, for the old call site)
    from ldm.speedups import speed_up

    return speed_up(unet, deepcache_interval=interval)
