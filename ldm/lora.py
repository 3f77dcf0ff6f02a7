"""LoRA adapters (Hu et al. 2021): train them with peft, save them as kohya files, apply or fuse them.

A LoRA adds ``scale * alpha / rank * up @ down`` to a frozen weight, with ``down`` of shape
(rank, in) and ``up`` of shape (out, rank) (Hu et al. 2021, eq. 3, with the alpha/rank scaling of
their section 4.1). Training injects peft ``LoraLayer``s on the attention projections
(U-Net ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; CLIP ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

File format written: kohya's ``.safetensors`` convention, read by diffusers' ``load_lora_weights``,
AUTOMATIC1111 and ComfyUI. Our module names are diffusers' names, so a key is the module path with
dots replaced by underscores::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (rank, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (out, rank)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             ()
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                  ...

``apply_lora`` also reads diffusers' peft format (``unet.<module>.lora_A.weight`` /
``text_encoder.<module>.lora_B.weight``, alpha = rank).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.errors import CheckpointError, InputError
from ldm.io import atomic_write

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
TRAINING_ADAPTER = "ldm"


@dataclass
class LoraWeights:
    down: torch.Tensor  # (rank, in, ...) : lora_A
    up: torch.Tensor  # (out, rank, ...) : lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size, scale: float) -> torch.Tensor:
        """``scale * alpha / rank * up @ down`` in the shape of the adapted weight (Linear or Conv2d)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (scale * self.alpha / self.rank) * product.reshape(shape)


def add_adapters(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> nn.Module:
    """Inject trainable LoRA layers on ``targets`` of ``model`` (in place); every other weight is frozen.

    ``up`` starts at zero, so the adapted model equals the base model before the first step.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=True)
    model = inject_adapter_in_model(config, model, adapter_name=TRAINING_ADAPTER)
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if f".{TRAINING_ADAPTER}." in name and ("lora_A" in name or "lora_B" in name):
            parameter.requires_grad_(True)
    return model


def _base_name(module_name: str) -> str:
    return module_name.removesuffix(".base_layer")


def _flat_name(part: str, module_name: str) -> str:
    """The kohya spelling of a module path; CLIP paths always start at ``text_model`` (as in
    transformers 4), whether or not this transformers version nests the encoder under it."""
    if part == "text_encoder" and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return module_name.replace(".", "_")


def adapter_state(models: dict[str, nn.Module | None], adapter: str = TRAINING_ADAPTER) -> dict[str, torch.Tensor]:
    """The kohya-named tensors of ``adapter`` in ``{"unet": unet, "text_encoder": text_encoder}``."""
    state: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                key = PREFIXES[part] + _flat_name(part, name)
                state[f"{key}.lora_down.weight"] = module.lora_A[adapter].weight.detach().float().cpu().contiguous()
                state[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().float().cpu().contiguous()
                state[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha[adapter]))
    return state


def save_lora(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None) -> Path:
    """Write the trained adapters of ``unet`` (and ``text_encoder``) as a kohya ``.safetensors`` file, atomically."""
    state = adapter_state({"unet": unet, "text_encoder": text_encoder})
    if not state:
        raise InputError("the model holds no trained LoRA adapter to save; train with --lora-rank first")
    metadata = {"format": "pt", "ldm_lora_format": "kohya"}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def read_lora(path: str | os.PathLike) -> dict[tuple[str, str], LoraWeights]:
    """``{(part, flat_name): LoraWeights}`` from a kohya or diffusers-peft file; ``flat_name`` has ``_`` for ``.``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist; check the path")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read LoRA file {path} ({error}); it must be a .safetensors file") from None
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part, flat, kind = _parse_key(key)
        if part is None:
            raise CheckpointError(f"{path}: key {key!r} is neither kohya (lora_unet_/lora_te_) nor diffusers (unet./text_encoder.) LoRA format")
        parts.setdefault((part, flat), {})[kind] = tensor
    weights = {}
    for (part, flat), found in parts.items():
        if "down" not in found or "up" not in found:
            raise CheckpointError(f"{path}: LoRA module {flat} lacks its down or up weight; the file is incomplete")
        alpha = float(found["alpha"]) if "alpha" in found else float(found["down"].shape[0])
        weights[(part, flat)] = LoraWeights(found["down"], found["up"], alpha)
    return weights


def _parse_key(key: str) -> tuple[str | None, str, str]:
    for part, prefix in PREFIXES.items():
        if key.startswith(prefix):
            module, _, kind = key[len(prefix):].partition(".")
            return part, module, {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(kind, kind)
    for part in PREFIXES:
        for suffix, kind in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if key.startswith(part + ".") and key.endswith(suffix):
                return part, _flat_name(part, key[len(part) + 1:-len(suffix)]), kind
    return None, "", ""


def _modules_by_flat_name(part: str, model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and ".lora_" not in name:
            found[_flat_name(part, _base_name(name))] = (_base_name(name), module)
    return found


def apply_lora(
    unet: nn.Module, text_encoder: nn.Module | None, path: str | os.PathLike, scale: float = 1.0, fuse: bool = False
) -> str | None:
    """Apply the LoRA file at ``path`` to ``unet`` / ``text_encoder`` with strength ``scale``.

    ``fuse=True`` adds the low-rank update into the weights (no run-time cost, not removable) and
    returns None; otherwise peft adapter layers are injected and their adapter name is returned.
    Several files can be applied one after another; all their adapters stay active.
    """
    weights = read_lora(path)
    models = {"unet": unet, "text_encoder": text_encoder}
    targets: dict[str, dict[str, LoraWeights]] = {"unet": {}, "text_encoder": {}}
    lookup = {part: _modules_by_flat_name(part, model) for part, model in models.items() if model is not None}
    for (part, flat), lora in weights.items():
        if part not in lookup:
            raise InputError(f"{path} adapts the text encoder but no text encoder was given")
        modules = lookup[part]
        if flat not in modules:
            raise CheckpointError(f"{path}: LoRA module {flat} does not exist in the {part}; the file is for another architecture")
        name, module = modules[flat]
        if lora.up.shape[0] != module.weight.shape[0] or lora.down[0].numel() != module.weight[0].numel():
            raise CheckpointError(f"{path}: LoRA module {flat} has shapes {tuple(lora.up.shape)} x {tuple(lora.down.shape)}, the weight is {tuple(module.weight.shape)}")
        targets[part][name] = lora
    if fuse:
        with torch.no_grad():
            for part, loras in targets.items():
                modules = dict(models[part].named_modules()) if loras else {}
                for name, lora in loras.items():
                    weight = modules[name].weight
                    weight += lora.delta(weight.shape, scale).to(weight.device, weight.dtype)
        return None
    adapter = _free_adapter_name(unet, text_encoder)
    for part, loras in targets.items():
        if loras:
            _inject(models[part], loras, adapter, scale)
    return adapter


def _free_adapter_name(*models: nn.Module | None) -> str:
    used = set()
    for model in models:
        if model is not None:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    used.update(module.lora_A.keys())
    number = 0
    while f"lora{number}" in used:
        number += 1
    return f"lora{number}"


def _inject(model: nn.Module, loras: dict[str, LoraWeights], adapter: str, scale: float) -> None:
    first = next(iter(loras.values()))
    config = LoraConfig(
        r=first.rank,
        lora_alpha=first.alpha,
        target_modules=list(loras),
        rank_pattern={re.escape(name): lora.rank for name, lora in loras.items()},
        alpha_pattern={re.escape(name): lora.alpha for name, lora in loras.items()},
        lora_dropout=0.0,
    )
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        # Stacking several files is intended; peft warns whenever a second adapter is added.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, lora in loras.items():
            layer = modules[name]
            layer.lora_A[adapter].weight.copy_(lora.down.reshape(layer.lora_A[adapter].weight.shape))
            layer.lora_B[adapter].weight.copy_(lora.up.reshape(layer.lora_B[adapter].weight.shape))
            layer.set_scale(adapter, scale)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(list(module.lora_A.keys()), inference_mode=True)
    # Injection marks only adapters trainable; an inference model keeps its previous flags.
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, False))


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` (the ``--lora`` argument) as ``(path, scale)``; scale defaults to 1."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0
