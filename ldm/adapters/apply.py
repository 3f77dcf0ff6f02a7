"""Adapters applied to a U-Net and text encoder by patching weights, and managed by name.

As AUTOMATIC1111 and ComfyUI do, an adapter changes the weights it targets instead of adding layers:
the first adapter that touches a module keeps a copy of its original weight and bias (on the CPU),
and the module's weight is then recomputed from that copy and every adapter on it, in load order:

    W_0 = original,   W_i = W_{i-1} + s_i · ΔW_i                                  (LoRA, LoHa, LoKr, diff)
                      W_i = W_{i-1} + s_i · (m_i · V / ||V|| - W_{i-1}),  V = W_{i-1} + ΔW_i     (DoRA)

(ΔW_i as ``ldm.adapters.formats`` defines it, s_i the adapter's scale, which may differ between the
U-Net and the text encoders, as A1111's ``<lora:NAME:TE:UNET>`` asks; a diff's bias likewise.) SDXL's
second text encoder is a third network beside the U-Net and the first (``text_encoder_2``; the SDXL
refiner has it alone), patched, listed, rescaled and dropped the same way. Sums
do not depend on the order; a DoRA adapter decomposes the weight that the adapters before it made, as
ComfyUI applies its patches one after another. A DoRA adapter at scale s interpolates between the
weight before it and its decomposed weight, as ComfyUI and AUTOMATIC1111 do (so scale 0 is no change;
LyCORIS's own merge instead scales the magnitude ratio and always adds ΔW).

So each adapter costs nothing per step, every kind is applied the same way, and listing, changing a
scale or dropping an adapter is exact: the weight is recomputed from the original, which a drop
restores bit for bit. ``fuse=True`` merges an adapter into the original itself: it keeps no copy
and cannot be dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ldm.adapters.files import ModuleUpdate, check_scale, read_adapter
from ldm.adapters.formats import BadTensors, Difference, DoRA, Update, fits
from ldm.adapters.families import check_family, misplaced, model_family
from ldm.adapters.keys import TEXT_PARTS, module_lookup
from ldm.errors import CheckpointError, InputError

LINEAR_OR_CONV = (nn.Linear, nn.Conv2d)
NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass
class Target:
    """One adapter's update of one module of a model."""

    module: nn.Module
    update: Update
    dora: DoRA | None

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) after this update at ``scale``, from float32 ``weight`` / ``bias`` (see the module docstring)."""
        delta = self.update.delta(weight.device).reshape(weight.shape)
        if self.dora is not None:
            return weight + scale * (self.dora.decompose(weight + delta) - weight), bias
        if isinstance(self.update, Difference) and self.update.bias is not None:
            bias = bias + scale * self.update.bias.float().to(bias.device)
        return weight + scale * delta, bias


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter, as ``Adapters.list`` shows it."""

    name: str
    path: Path
    scale: float  # of its U-Net modules, and of its text encoders' unless text_encoder_scale is given
    kinds: tuple[str, ...]  # e.g. ("LoRA",), ("DoRA (LoKr)", "norm diff")
    modules: int  # how many modules it changes
    fused: bool  # merged into the weights: it cannot be dropped or rescaled
    text_encoder_scale: float | None = None  # of its modules in both text encoders; None: ``scale``

    def scale_of(self, part: str) -> float:
        """The scale of the adapter's modules in ``part`` ("unet", "text_encoder" or "text_encoder_2")."""
        return self.text_encoder_scale if part in TEXT_PARTS and self.text_encoder_scale is not None else self.scale


@dataclass
class _Loaded:
    info: AdapterInfo
    targets: dict[tuple[str, str], Target]  # (part, module path) -> its update; empty once fused


class Adapters:
    """The adapters applied to ``unet``, ``text_encoder`` and SDXL's ``text_encoder_2``, by name, in load order."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None, text_encoder_2: nn.Module | None = None):
        self.models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        self._loaded: dict[str, _Loaded] = {}
        # (part, module path) -> (module, original weight, original bias), of modules that removable adapters patch
        self._originals: dict[tuple[str, str], tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = {}

    def load(
        self, path: str | os.PathLike, scale: float = 1.0, fuse: bool = False, name: str | None = None,
        text_encoder_scale: float | None = None,
    ) -> str:
        """Apply the adapter file at ``path`` with strength ``scale`` (``text_encoder_scale`` on the text
        encoders, if given); returns its name (``name``, or the file's stem made unique). The whole file is
        checked before either model changes."""
        scale = check_scale(scale, path)
        text_encoder_scale = None if text_encoder_scale is None else check_scale(text_encoder_scale, path)
        if name is not None and name in self._loaded:
            raise InputError(f"an adapter named {name!r} is already loaded; pass another name or delete it first")
        name = name if name is not None else self._free_name(Path(path).stem)
        targets = self._place(path, read_adapter(path))
        kinds = tuple(sorted({_kind(target) for target in targets.values()}))
        info = AdapterInfo(name, Path(path), scale, kinds, len(targets), fuse, text_encoder_scale)
        touched = set(targets)
        with torch.no_grad():
            if fuse:
                self._fuse(targets, info)
                targets = {}  # nothing to recompute from: the update is part of the weights now
            else:
                for key, target in targets.items():
                    self._keep_original(key, target.module)
            self._loaded[name] = _Loaded(info, targets)
            self._recompute(touched & set(self._originals))
        return name

    def list(self) -> list[AdapterInfo]:
        """Every loaded adapter, in load order (fused ones included)."""
        return [loaded.info for loaded in self._loaded.values()]

    def set_scale(self, name: str, scale: float, text_encoder_scale: float | None = None) -> None:
        """Change the strength of adapter ``name`` (``text_encoder_scale``: on the text encoder, if other);
        its modules are recomputed from their originals, unless the scales are what they were."""
        loaded = self._removable(name, "rescale")
        path = loaded.info.path
        new = replace(
            loaded.info, scale=check_scale(scale, path),
            text_encoder_scale=None if text_encoder_scale is None else check_scale(text_encoder_scale, path),
        )
        if (new.scale_of("unet"), new.scale_of("text_encoder")) == (loaded.info.scale_of("unet"), loaded.info.scale_of("text_encoder")):
            loaded.info = new
            return
        loaded.info = new
        with torch.no_grad():
            self._recompute(set(loaded.targets))

    def move_to_end(self, names: list[str]) -> None:
        """Apply the removable adapters ``names`` last, in this order; the modules of those that move are
        recomputed (the order matters to DoRA, and to rounding)."""
        order = list(self._loaded)
        wanted = [n for n in order if n not in names] + list(names)
        for name in names:
            self._removable(name, "reorder")
        if wanted == order:
            return
        moved = next(i for i, (a, b) in enumerate(zip(order, wanted)) if a != b)
        for name in names:
            self._loaded[name] = self._loaded.pop(name)
        with torch.no_grad():
            self._recompute({key for name in wanted[moved:] for key in self._loaded[name].targets})

    def delete(self, name: str) -> None:
        """Drop adapter ``name``; a module no adapter changes any more gets its original weights back, exactly."""
        loaded = self._removable(name, "drop")
        del self._loaded[name]
        with torch.no_grad():
            self._recompute(set(loaded.targets))

    def _removable(self, name: str, action: str) -> _Loaded:
        if name not in self._loaded:
            loaded = ", ".join(repr(n) for n in self._loaded) or "none"
            raise InputError(f"no adapter named {name!r} is loaded (loaded: {loaded}); list them with lora_adapters()")
        if self._loaded[name].info.fused:
            raise InputError(
                f"adapter {name!r} was fused into the weights, so ldm cannot {action} it; "
                f"reload the model, or load adapters with fuse=False"
            )
        return self._loaded[name]

    def _free_name(self, stem: str) -> str:
        name, number = stem, 1
        while name in self._loaded:
            number += 1
            name = f"{stem}_{number}"
        return name

    def _place(self, path: str | os.PathLike, updates: dict[tuple[str, str], ModuleUpdate]) -> dict[tuple[str, str], Target]:
        return place(self.models, path, updates)

    def _keep_original(self, key: tuple[str, str], module: nn.Module) -> None:
        if key not in self._originals:
            bias = module.bias.detach().to("cpu", copy=True) if module.bias is not None else None
            self._originals[key] = (module, module.weight.detach().to("cpu", copy=True), bias)

    def _fuse(self, targets: dict[tuple[str, str], Target], info: AdapterInfo) -> None:
        """Merge into the weights, or into the originals of modules that removable adapters patch."""
        for key, target in targets.items():
            _, weight, bias = self._originals.get(key, (None, target.module.weight, target.module.bias))
            new_weight, new_bias = target.apply(weight.float(), None if bias is None else bias.float(), info.scale_of(key[0]))
            weight.copy_(new_weight.to(weight.device, weight.dtype))
            if bias is not None:
                bias.copy_(new_bias.to(bias.device, bias.dtype))

    def _recompute(self, keys: set[tuple[str, str]]) -> None:
        """Set each module's weight from its original and the removable adapters on it, in load order."""
        for key in keys:
            patches = [(loaded.targets[key], loaded.info.scale_of(key[0])) for loaded in self._loaded.values() if key in loaded.targets]
            module, original_weight, original_bias = self._originals[key]
            if not patches:
                module.weight.copy_(original_weight)
                if original_bias is not None:
                    module.bias.copy_(original_bias)
                del self._originals[key]
                continue
            device = module.weight.device
            weight = original_weight.to(device, torch.float32)
            bias = original_bias.to(device, torch.float32) if original_bias is not None else None
            for target, scale in patches:
                weight, bias = target.apply(weight, bias, scale)
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)


def place(
    models: dict[str, nn.Module | None], path: str | os.PathLike, updates: dict[tuple[str, str], ModuleUpdate]
) -> dict[tuple[str, str], Target]:
    """``{(part, module path): Target}`` of ``models`` (``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}``,
    meta-device models will do); every entry names a module whose weight its update fits. A file made for the other
    family of models (SD 1.x/2.x or SDXL, ``ldm.adapters.families``) is refused first."""
    lookups = {part: module_lookup(part, model) for part, model in models.items() if model is not None}
    family = model_family(models, lookups["unet"])
    check_family(path, family, [(part, flat, found.key, found.shape) for (part, flat), found in updates.items()])
    targets: dict[tuple[str, str], Target] = {}
    keys: dict[tuple[str, str], str] = {}
    for (part, flat), found in updates.items():
        if part not in lookups or flat not in lookups[part]:
            other_family = misplaced(path, family, part, flat, found.key, found.shape)
            if other_family is not None:
                raise other_family
        if part not in lookups:
            raise InputError(f"{path} adapts the {PART_NAMES[part]} (key {found.key!r}) but the model given has none")
        if flat not in lookups[part]:
            raise CheckpointError(
                f"{path}: key {found.key!r} is for a module that does not exist in the {part} ({flat}); "
                f"the file is for another architecture"
            )
        module_path, module = lookups[part][flat]
        if (part, module_path) in keys:
            raise CheckpointError(f"{path}: key {found.key!r} adapts the same module as {keys[part, module_path]!r}; keep one of them")
        keys[part, module_path] = found.key
        targets[part, module_path] = Target(module, found.update, _check_fit(path, found, module))
    return targets


PART_NAMES = {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_2": "second text encoder (SDXL's OpenCLIP bigG)"}


def _kind(target: Target) -> str:
    return f"DoRA ({target.update.kind})" if target.dora is not None else target.update.kind


def _check_fit(path: str | os.PathLike, found: ModuleUpdate, module: nn.Module) -> DoRA | None:
    """The update's kind suits the module and its shape fits the weight (and bias); returns its DoRA, if any."""
    norm = found.update.kind == "norm diff"
    if not isinstance(module, NORMS if norm else LINEAR_OR_CONV):
        wanted = "a GroupNorm or LayerNorm" if norm else "a Linear or Conv2d"
        raise CheckpointError(f"{path}: key {found.key!r} is a {found.update.kind}, which adapts {wanted}, not a {type(module).__name__}")
    weight = module.weight
    if not fits(found.shape, tuple(weight.shape)):
        raise CheckpointError(
            f"{path}: key {found.key!r} has {found.update.kind} weights of shape {found.shape}, which do not fit the weight {tuple(weight.shape)}"
        )
    if isinstance(found.update, Difference) and found.update.bias is not None:
        bias_shape = None if module.bias is None else tuple(module.bias.shape)
        if tuple(found.update.bias.shape) != bias_shape:
            raise CheckpointError(
                f"{path}: key {found.key!r} has a bias difference of shape {tuple(found.update.bias.shape)}, but the bias is {bias_shape}"
            )
    if found.magnitude is None:
        return None
    key, magnitude = found.magnitude
    try:
        return DoRA.read(key, magnitude, tuple(weight.shape), peft="lora_magnitude_vector" in key)
    except BadTensors as bad:
        raise CheckpointError(f"{path}: key {bad.key!r} {bad.reason}") from None
