"""Training LoRA adapters with peft (Hu et al. 2021) and saving them as a kohya file.

Training injects peft ``LoraLayer``s on the attention projections (U-Net ``to_q``, ``to_k``, ``to_v``,
``to_out.0``; CLIP ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``). The file is written in kohya's
``.safetensors`` layout, which diffusers' ``load_lora_weights``, AUTOMATIC1111, ComfyUI and
``ldm.adapters`` read; our module names are diffusers', so a key is the module path with ``_`` for ``.``::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (rank, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (out, rank)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             ()
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                  ...

An SDXL U-Net's keys take the original SD module names instead, as kohya's sd-scripts writes SDXL LoRAs
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); every reader above reads both.

Its metadata is kohya's (``ss_*``, ``sshs_*``, ``modelspec.*``; see ``save_lora``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ldm.adapters.keys import flat_name, original_namer
from ldm.errors import InputError
from ldm.io import atomic_write
from ldm.loading.hashes import kohya_hashes
from ldm.loading.writers import write_safetensors

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
TRAINING_ADAPTER = "ldm"
# kohya's name for a LoRA network of this key layout (``ss_network_module``): A1111 and the sharing sites
# read it as "a LoRA", whichever layers it adapts.
NETWORK_MODULE = "networks.lora"


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


def adapter_state(models: dict[str, nn.Module | None], adapter: str = TRAINING_ADAPTER) -> dict[str, torch.Tensor]:
    """The kohya-named tensors of ``adapter`` in ``{"unet": unet, "text_encoder": text_encoder}``."""
    state: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        if model is None:
            continue
        flat = kohya_namer(part, model)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                key = PREFIXES[part] + flat(name)
                state[f"{key}.lora_down.weight"] = module.lora_A[adapter].weight.detach().float().cpu().contiguous()
                state[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().float().cpu().contiguous()
                state[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha[adapter]))
    return state


def kohya_namer(part: str, model: nn.Module) -> Callable[[str], str]:
    """The flat kohya name of a module of ``part``: diffusers' module path, except on an SDXL U-Net, whose LoRAs kohya's
    sd-scripts write (and most published ones are) in the original SD names (``input_blocks_4_1_…``)."""
    if part != "unet" or not is_sdxl_unet(model):
        return lambda name: flat_name(part, name)
    original_name = original_namer(model)
    return lambda name: flat_name(part, original_name(name) or name)


def is_sdxl_unet(unet: nn.Module) -> bool:
    """Whether the U-Net has SDXL's added (text and micro-conditioning) embedding."""
    return unet.add_embedding is not None


def save_lora(
    path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the trained adapters of ``unet`` (and ``text_encoder``) as a kohya ``.safetensors`` file, atomically.

    The metadata is kohya's, as A1111, ComfyUI and the model-sharing sites read it: the network's module,
    rank and alpha (``ss_network_*``), the caller's ``metadata`` (``ldm.training.lora_metadata``: the run's
    settings and data), and the file's hashes (``sshs_model_hash``, ``sshs_legacy_hash``;
    ``ldm.loading.hashes.kohya_hashes``).
    """
    state = adapter_state({"unet": unet, "text_encoder": text_encoder})
    if not state:
        raise InputError("the model holds no trained LoRA adapter to save; train with --lora-rank first")
    ranks = sorted({tensor.shape[0] for key, tensor in state.items() if key.endswith(".lora_down.weight")})
    alphas = sorted({float(tensor) for key, tensor in state.items() if key.endswith(".alpha")})
    found = {
        "format": "pt",
        "ldm_lora_format": "kohya",
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",  # kohya's word for mixed ranks
        "ss_network_alpha": str(alphas[0]) if len(alphas) == 1 else "Dynamic",
    }
    metadata = {**found, **(metadata or {})}
    model_hash, legacy_hash = kohya_hashes(state, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    # Written in a fixed order (safetensors' own writer orders the metadata differently per process).
    return atomic_write(path, lambda tmp: write_safetensors(Path(tmp), state, metadata))
