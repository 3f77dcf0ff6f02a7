"""The trained state when parameters may be sharded: gathered whole for checkpoints, samples and the
result, and put back in shards on resume.

Under one process or DDP every rank holds full parameters. Under FSDP2 (accelerate's
``fsdp_version: 2``, i.e. ``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` of
which each rank holds one slice (placement ``Shard(0)``); its optimizer moments are DTensors of the
same layout. Two operations cover both cases:

    full_tensor(t)        the whole tensor (an all-gather for a DTensor; every rank must call it)
    shard_like(full, t)   the slice of ``full`` this rank holds in ``t``'s layout

Saved tensors are named by module path ("unet.down_blocks.0...."), never by position or rank, so a
checkpoint does not depend on how the parameters were sharded when it was written. Functions whose
docstring says "collective" must be called by every rank in the same order.

Backends: DDP and FSDP2. Refused with a one-line error: FSDP1 (accelerate's ``_prepare_fsdp`` flattens
parameters, and its gradient clipping of a parameter subset, as LoRA trains, would use each rank's
local norm), DeepSpeed (its engine owns the optimizer step, gradient accumulation and checkpoints,
which this loop does itself), and FSDP or DeepSpeed requested where accelerate does not enable them
(accelerate 1.15 turns them on only for GPU-type devices; on CPU it silently runs plain DDP).
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm.errors import ConfigError
from ldm.models.unet import DownBlock, UpBlock


def check_backend(accelerator: Accelerator, train_text_encoder: bool) -> None:
    """Refuse the distributed set-ups this loop does not handle correctly (see the module docstring)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("ldm finetune does not run under DeepSpeed; shard with FSDP2 instead (accelerate launch --use_fsdp --fsdp_version 2)")
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
        raise ConfigError(f"FSDP was requested but accelerate runs this launch as {kind.value} (it shards on GPUs only); drop --use_fsdp")
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("ldm finetune under FSDP needs FSDP2; launch with --fsdp_version 2 (or fsdp_version: 2 in the accelerate config)")
    if kind == DistributedType.FSDP and train_text_encoder:
        # accelerate 1.15's FSDP2 prepare shards only the last model of a prepare() call.
        raise ConfigError("--train-text-encoder is not supported under FSDP; train the U-Net only, or use DDP")


def check_units(model: nn.Module) -> None:
    """Refuse FSDP2 units that cannot work. FSDP2 rebuilds a unit's positional arguments (to hook its
    backward), so list arguments arrive as copies; ``DownBlock`` and ``UpBlock`` push to and pop from
    the U-Net's list of skip connections and would lose them. Their parts are fine units."""
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule) and isinstance(module, (DownBlock, UpBlock)):
            kind = "DownBlock" if isinstance(module, DownBlock) else "UpBlock"
            raise ConfigError(f"FSDP cannot shard {name} as a unit ({kind} passes the skip list on); "
                              "wrap ResnetBlock,SpatialTransformer (--fsdp_transformer_layer_cls_to_wrap) instead")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Collective for a DTensor: the whole tensor on every rank. A plain tensor is returned as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Collective for a DTensor ``like``: ``full`` split the way ``like`` is (every rank passes the same ``full``)."""
    full = full.to(like.device, like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full


def gather_tensors(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Collective. Whole copies on the CPU, gathered in the dict's order (the same on every rank).
    ``keep=False`` (ranks that only help gather) returns {} without holding the whole model."""
    whole = {}
    for name, value in tensors.items():
        value = full_tensor(value.detach())
        if keep:
            whole[name] = value.cpu().clone()
    return whole


def trainable_parameters(models: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """The trained parameters, named "<model>.<module path>" (the names checkpoints use)."""
    return {
        f"{name}.{key}": p for name, model in models.items() for key, p in model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def load_parameters(parameters: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Collective. Copy whole saved tensors into (possibly sharded) parameters of the same names."""
    for name, parameter in parameters.items():
        parameter.copy_(shard_like(tensors[name], parameter))


def gather_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict:
    """Collective. ``optimizer.state_dict()`` keyed by parameter name with whole tensors:
    ``{"state": {name: {"exp_avg": ..., ...}}, "param_groups": [{..., "params": [names]}]}``."""
    state = optimizer.state_dict()
    by_index = [names[p] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**group, "params": [by_index[i] for i in group["params"]]} for group in state["param_groups"]]
    moments = {by_index[i]: gather_tensors(values) for i, values in state["state"].items()}
    return {"state": moments, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, names: dict[nn.Parameter, str]) -> None:
    """Collective. The inverse of ``gather_optimizer_state`` for an optimizer over the same named parameters."""
    current = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
    if [set(group) for group in current] != [set(group["params"]) for group in saved["param_groups"]]:
        raise ConfigError("cannot resume: the checkpoint's optimizer covers other parameters than this run trains")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    index = {names[p]: i for i, p in enumerate(parameters)}
    state = {}
    for name, values in saved["state"].items():
        # A moment has its parameter's layout; the step counter is a scalar kept whole on every rank.
        like = parameters[index[name]]
        state[index[name]] = {k: shard_like(v, like) if v.dim() and v.shape == like.shape else v for k, v in values.items()}
    # torch matches saved groups to the optimizer's by position, and their parameters in this optimizer's order.
    groups = [{**group, "params": [index[n] for n in ours]} for group, ours in zip(saved["param_groups"], current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory); buffers are copied.

    Taken before sharding, it is what ``materialize`` fills with gathered weights: FSDP2 changes
    the module in place and offers no way back to a plain one.
    """
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module with ``skeleton``'s structure and ``state``'s whole weights (a full state dict)."""
    plain = meta_skeleton(skeleton)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain
