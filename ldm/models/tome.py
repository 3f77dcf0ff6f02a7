"""Transition shim: ``ldm.pipeline`` still merges tokens with ``token_merging(unet, ratio)`` around its
denoising loop. Token merging now lives in ``ldm.speedups.tome`` and travels with each call; until the
pipeline builds its network with ``ldm.speedups.speed_up``, this context manager adds the hooks to every
call of ``unet`` in the block (a forward pre-hook, removed afterwards). This file goes at that change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from torch import nn


@contextmanager
def token_merging(unet: nn.Module, ratio: float) -> Iterator[None]:
    from ldm.models.unet import UNetHooks
    from ldm.speedups.tome import token_merging_hooks

    attention = token_merging_hooks(unet, ratio)

    def add_hooks(module, args, kwargs):
        given = kwargs.get("hooks") or UNetHooks()
        return args, {**kwargs, "hooks": replace(given, self_attention=attention)}

    handle = unet.register_forward_pre_hook(add_hooks, with_kwargs=True) if attention else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
