"""The alpha of LoRA files that diffusers saves with peft's configuration in their metadata.

A diffusers / peft layout file holds no ``alpha`` tensors. diffusers' ``save_lora_weights`` (given the
adapter's metadata, as its training scripts give it) writes the adapter's ``LoraConfig`` into the safetensors header instead, under ``lora_adapter_metadata``:
a JSON object whose keys are the config's fields prefixed by the network (``unet.r``,
``unet.lora_alpha``, ``unet.alpha_pattern``, ``text_encoder.use_rslora``...). diffusers' loader builds
the adapter from it, so a module's scale is peft's (Hu et al. 2021, sec. 4.1; rsLoRA:
Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"):

    scale = alpha / r          alpha / sqrt(r) with use_rslora

where ``r`` and ``alpha`` are the config's, or the value of the first ``rank_pattern`` /
``alpha_pattern`` key that ends the module's path at a dot boundary (peft's ``get_pattern_key``).
A file without the metadata scales by 1 (alpha = r), as diffusers does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ldm.errors import CheckpointError

METADATA_KEY = "lora_adapter_metadata"  # diffusers' loaders/lora_base.py


@dataclass(frozen=True)
class PeftLoraConfig:
    """The fields of one network's peft ``LoraConfig`` that set its modules' scales."""

    r: int = 8  # peft's defaults
    lora_alpha: float = 8
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def scale(self, module: str) -> float:
        """The scale of the update of ``module`` (its path in the network)."""
        rank = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def peft_configs(path: Path) -> dict[str, PeftLoraConfig]:
    """``{network: config}`` from the safetensors header of ``path`` (empty without the metadata)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as file:
        raw = (file.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} is not JSON ({error.msg}); the file is broken") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} must be a JSON object")
    fields_by_network: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        network, _, name = key.partition(".")
        if name in PeftLoraConfig.__dataclass_fields__:
            fields_by_network.setdefault(network, {})[name] = value
    return {network: _config(path, network, found) for network, found in fields_by_network.items()}


def _config(path: Path, network: str, found: dict[str, Any]) -> PeftLoraConfig:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0

    patterns_ok = all(
        isinstance(found.get(name, {}), dict) and all(number(v) for v in found.get(name, {}).values())
        for name in ("rank_pattern", "alpha_pattern")
    )
    if not (all(number(found[name]) for name in ("r", "lora_alpha") if name in found) and patterns_ok):
        raise CheckpointError(
            f"{path}: metadata {METADATA_KEY!r} gives {network}'s rank or alpha as something other than positive numbers; the file is broken"
        )
    if not isinstance(found.get("use_rslora", False), bool):
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} gives {network}.use_rslora as {found['use_rslora']!r}, not true/false")
    return PeftLoraConfig(**found)
