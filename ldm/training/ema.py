"""Exponential moving average of the trained weights (Polyak & Juditsky 1992), as kept by SD training.

Only trainable parameters are averaged (the frozen ones never change). The decay warms up as
min(decay, (1 + n) / (10 + n)) after n updates, so the first averages are not dominated by the
random or pre-trained starting point.

Sharding: the average is built from the parameters after accelerate has prepared the model, so
under FSDP2 each shadow tensor is a DTensor holding this rank's slice, exactly as its parameter.
The update is element-wise, so each rank averages its own slice and no communication is needed per
step; the average is gathered whole only when a checkpoint is written (``state_dict``, collective)
and split again on resume (``load_state_dict``). Gathering the whole model at every step instead
would cost an all-gather and a full copy on every rank per step, which is what sharding avoids.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.training.distributed import full_tensor, shard_like


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, parameter in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(parameter.detach().float(), 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if name in self.shadow:
                parameter.copy_(self.shadow[name].to(parameter.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Collective under sharding: whole CPU tensors on every rank."""
        whole = {name: full_tensor(value).cpu().clone() for name, value in self.shadow.items()}
        return {**whole, "__updates__": torch.tensor(self.updates)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Collective under sharding: every rank passes the same whole tensors."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name in self.shadow:
            self.shadow[name].copy_(shard_like(state[name], self.shadow[name]))
        self.updates = int(state["__updates__"])
