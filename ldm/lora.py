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

``apply_lora`` also reads every layout diffusers has written (alpha = rank in each), after a
``unet.`` or ``text_encoder.`` prefix: peft's ``<module>.lora_A.weight`` / ``.lora_B.weight``;
``<module>.lora.down.weight`` / ``.lora.up.weight`` (diffusers 0.2x U-Nets, the published LCM-LoRA
files); ``<module>.lora_linear_layer.down.weight`` (diffusers 0.2x text encoders); and the attention
processors of diffusers 0.1x, ``<attention>.processor.to_q_lora.down.weight``, which adapt
``<attention>.to_q`` (U-Net) or ``<attention>.q_proj`` (CLIP).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ldm.errors import CheckpointError, InputError
from ldm import checks
from ldm.io import atomic_write
from ldm.loading.writers import write_safetensors

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # what save_lora writes
# kohya: the key's prefix names the network, the module path follows with "_" for ".", and its
# tensor's kind comes after the first dot. SDXL's first text encoder is "lora_te1_".
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
KOHYA_KINDS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers: "unet." or "text_encoder.", the module path, then one of these endings (one table per layout).
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
PEFT_KINDS = {".lora_A.weight": "down", ".lora_B.weight": "up"}
OLD_DIFFUSERS_KINDS = {".lora.down.weight": "down", ".lora.up.weight": "up"}
LINEAR_LAYER_KINDS = {".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}
DIFFUSERS_LAYOUTS = (PEFT_KINDS, OLD_DIFFUSERS_KINDS, LINEAR_LAYER_KINDS)
# diffusers 0.1x attention processors: "<attention>[.processor].to_q_lora.down.weight" adapts a
# projection of <attention>, named per network.
PROCESSOR_KINDS = {".down.weight": "down", ".up.weight": "up"}
PROCESSOR_PROJECTIONS = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text_encoder": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}
# Adapter kinds that ldm recognises but does not apply, by a piece of their key.
OTHER_KINDS = {
    "hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
    "lora_mid.": "LoCon (Tucker)", ".diff": "LyCORIS full-weight difference",
}  # fmt: skip
TRAINING_ADAPTER = "ldm"


@dataclass
class LoraWeights:
    down: torch.Tensor  # (rank, in, ...) : lora_A
    up: torch.Tensor  # (out, rank, ...) : lora_B
    alpha: float
    key: str  # the down weight's key in the file, named in errors

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
    # Written in a fixed order (safetensors' own writer orders the metadata differently per process).
    return atomic_write(path, lambda tmp: write_safetensors(Path(tmp), state, metadata))


def read_lora(path: str | os.PathLike) -> dict[tuple[str, str], LoraWeights]:
    """``{(part, flat_name): LoraWeights}`` from a kohya or diffusers-peft file; ``flat_name`` has ``_`` for ``.``.

    Every tensor is checked here, before any model is touched: a broken file is a ``CheckpointError``
    naming the file and the key, not a crash or NaN images later.
    """
    path = Path(path)
    modules: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in _load_tensors(path).items():
        part, flat, kind = _parse_key(path, key)
        found = modules.setdefault((part, flat), {})
        if kind in found:
            raise CheckpointError(f"{path}: key {key!r} adapts the same module as {found[kind][0]!r}; keep one of them")
        found[kind] = (key, tensor)
    return {module: _lora_weights(path, found) for module, found in modules.items()}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise InputError(f"LoRA path {path} is a folder, not a LoRA file; give the .safetensors file in it")
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist; check the path")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read LoRA file {path} ({error}); it must be a .safetensors file") from None
    if not tensors:
        raise CheckpointError(f"LoRA file {path} holds no tensors; it is empty")
    return tensors


def _parse_key(path: Path, key: str) -> tuple[str, str, str]:
    """``(part, flat module name, "down" | "up" | "alpha")`` of a key in any layout ldm reads."""
    layout = _layout(key)
    if layout is None:
        raise CheckpointError(
            f"{path}: key {key!r} is neither kohya (lora_unet_/lora_te_) nor diffusers (unet./text_encoder.) LoRA format; "
            f"give a LoRA file"
        )
    part, rest, read = layout
    parsed = read(part, rest)
    if parsed is None:
        raise CheckpointError(f"{path}: key {key!r} {_kind_of(key)}, not a LoRA down or up weight or alpha; ldm applies LoRA files only")
    flat, kind = parsed
    return part, flat, kind


def _layout(key: str) -> tuple[str, str, Callable[[str, str], tuple[str, str] | None]] | None:
    """The key's network, the rest of the key after its prefix, and the reader of that rest (None: no LoRA prefix)."""
    for prefix, part in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return part, key[len(prefix):], _kohya_module
    for prefix, part in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            return part, key[len(prefix):], _diffusers_module
    return None


def _kohya_module(part: str, rest: str) -> tuple[str, str] | None:
    """``(flat module name, kind)`` of ``<flat_name>.<kind>``, or None for a kind not in KOHYA_KINDS."""
    module, _, ending = rest.partition(".")
    kind = KOHYA_KINDS.get(ending)
    return None if kind is None else (module, kind)


def _diffusers_module(part: str, rest: str) -> tuple[str, str] | None:
    """``(flat module name, kind)`` of ``<module path><ending>`` in one of diffusers' layouts, or None."""
    for layout in DIFFUSERS_LAYOUTS:
        for ending, kind in layout.items():
            if rest.endswith(ending):
                return _flat_name(part, rest[: -len(ending)]), kind
    for ending, kind in PROCESSOR_KINDS.items():
        attention, _, name = rest.removesuffix(ending).rpartition(".")
        if rest.endswith(ending) and name in PROCESSOR_PROJECTIONS[part]:
            module = f"{attention.removesuffix('.processor')}.{PROCESSOR_PROJECTIONS[part][name]}"
            return _flat_name(part, module), kind
    return None


def _kind_of(key: str) -> str:
    """How an error names a key that is not a LoRA weight: its adapter kind when known."""
    for piece, kind in OTHER_KINDS.items():
        if piece in key:
            return f"is a {kind} weight"
    return "is of a kind ldm does not know"


def _lora_weights(path: Path, found: dict[str, tuple[str, torch.Tensor]]) -> LoraWeights:
    """One module's down, up and alpha, each checked: present, floating point, finite, ranks that agree."""
    for kind in ("down", "up"):
        if kind not in found:
            key = next(iter(found.values()))[0]
            raise CheckpointError(f"{path}: key {key!r} has no LoRA {kind} weight beside it; the file is incomplete")
    (down_key, down), (up_key, up) = found["down"], found["up"]
    for key, tensor in (found["down"], found["up"]):
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: key {key!r} holds {tensor.dtype} values, not floating-point weights")
        if tensor.dim() not in (2, 4):
            raise CheckpointError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}; LoRA weights are 2-D or 4-D")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: key {key!r} holds NaN or infinite values; the file is broken")
    if down.shape[0] < 1:
        raise CheckpointError(f"{path}: key {down_key!r} has rank 0; a LoRA needs rank 1 or more")
    if up.shape[1] != down.shape[0]:
        raise CheckpointError(
            f"{path}: key {up_key!r} has rank {up.shape[1]} but {down_key!r} has rank {down.shape[0]}; they must agree"
        )
    alpha = _alpha(path, found["alpha"]) if "alpha" in found else float(down.shape[0])
    return LoraWeights(down, up, alpha, down_key)


def _alpha(path: Path, entry: tuple[str, torch.Tensor]) -> float:
    key, tensor = entry
    # A boolean would pass as 1.0; it is a writer's bug, not a strength.
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise CheckpointError(f"{path}: key {key!r} holds a {tensor.dtype} alpha; it must be one real number")
    if tensor.numel() != 1:
        raise CheckpointError(f"{path}: key {key!r} holds {tensor.numel()} values; alpha must be one number")
    alpha = float(tensor)
    if not math.isfinite(alpha):
        raise CheckpointError(f"{path}: key {key!r} is alpha = {alpha}; it must be a finite number")
    return alpha


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
    Several files can be applied one after another; all their adapters stay active. The whole file
    is checked before either model is changed, so a refused file leaves them as they were.
    """
    check_scale(scale, path)
    models = {"unet": unet, "text_encoder": text_encoder}
    targets = _targets(path, read_lora(path), models)
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


def check_scale(scale: float, path: str | os.PathLike) -> None:
    """A LoRA strength must be a finite number: NaN or infinity would turn every image into NaN."""
    checks.finite(scale, f"the LoRA scale for {path}")


def _targets(
    path: str | os.PathLike, weights: dict[tuple[str, str], LoraWeights], models: dict[str, nn.Module | None]
) -> dict[str, dict[str, LoraWeights]]:
    """``{part: {module path: LoraWeights}}``; every entry names a Linear or Conv2d whose weight it fits."""
    targets: dict[str, dict[str, LoraWeights]] = {"unet": {}, "text_encoder": {}}
    lookup = {part: _modules_by_flat_name(part, model) for part, model in models.items() if model is not None}
    for (part, flat), lora in weights.items():
        if part not in lookup:
            raise InputError(f"{path} adapts the text encoder (key {lora.key!r}) but no text encoder was given")
        if flat not in lookup[part]:
            raise CheckpointError(
                f"{path}: key {lora.key!r} is for a module that does not exist in the {part} ({flat}); "
                f"the file is for another architecture"
            )
        name, module = lookup[part][flat]
        _check_fit(path, lora, module.weight)
        targets[part][name] = lora
    return targets


def _check_fit(path: str | os.PathLike, lora: LoraWeights, weight: torch.Tensor) -> None:
    """up must be (out, rank), down (rank, *weight.shape[1:]); a 1x1 conv and a Linear are interchangeable,
    since kohya stores a 1x1 conv's LoRA as 4-D and a linear projection's as 2-D."""
    up, down = _without_1x1(lora.up.shape), _without_1x1(lora.down.shape)
    if up != (weight.shape[0], lora.rank) or down[1:] != _without_1x1(weight.shape)[1:]:
        raise CheckpointError(
            f"{path}: key {lora.key!r} has shapes up {tuple(lora.up.shape)} x down {tuple(lora.down.shape)}, "
            f"which do not fit the weight {tuple(weight.shape)}"
        )


def _without_1x1(shape: torch.Size) -> tuple[int, ...]:
    return tuple(shape[:2]) if tuple(shape[2:]) == (1, 1) else tuple(shape)


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
    """``FILE[:SCALE]`` (the ``--lora`` argument) as ``(path, scale)``; scale defaults to 1.

    The tail after the last colon is the scale unless it holds a path separator (``C:/x.safetensors``).
    A tail that is not a number is an error, unless the whole text names an existing file (a colon
    in a file name); a scale that is not finite is an error.
    """
    head, sep, tail = text.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail:
        return Path(text), 1.0
    try:
        scale = float(tail)
    except ValueError:
        if Path(text).is_file():
            return Path(text), 1.0
        raise InputError(f"--lora {text}: scale {tail!r} is not a number; write FILE:SCALE, e.g. style.safetensors:0.8") from None
    check_scale(scale, head)
    return Path(head), scale
