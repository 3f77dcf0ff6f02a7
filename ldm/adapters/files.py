"""Reading an adapter file: every tensor placed (``keys``) and checked, grouped into one update per module.

The whole file is read and checked before any model is touched: a broken file is a one-line
``CheckpointError`` naming the file and the key, not a crash or NaN images later. The file's
modules are matched to a model's by ``ldm.adapters.apply``.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldm import checks
from ldm.adapters.formats import BadTensors, Difference, LoHa, LoKr, LoRA, Shape, Tensors, Update
from ldm.adapters.keys import UnknownKey, diffusers_module_path, parse_key
from ldm.adapters.peft_metadata import peft_configs
from ldm.errors import CheckpointError, InputError

# The tensor names that make each kind (besides "alpha" and the DoRA magnitudes).
KINDS = {
    "LoRA": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LoKr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full diff": ("diff", "diff_b"),
    "norm diff": ("w_norm", "b_norm"),
}
DORA_TENSORS = ("dora_scale", "lora_magnitude_vector")  # LyCORIS / kohya, peft


@dataclass
class ModuleUpdate:
    """What a file holds for one module: its update, and DoRA's magnitude if it has one."""

    update: Update
    shape: Shape  # of the update, as its tensors make it (``formats.fits`` compares it with the weight's)
    magnitude: tuple[str, torch.Tensor] | None  # (key, tensor) of dora_scale or lora_magnitude_vector
    key: str  # a key of this module in the file, named in errors

    @property
    def kind(self) -> str:
        return f"DoRA ({self.update.kind})" if self.magnitude is not None else self.update.kind


def read_adapter(path: str | os.PathLike) -> dict[tuple[str, str], ModuleUpdate]:
    """``{(part, flat module name): ModuleUpdate}`` of the adapter file at ``path``, every tensor checked."""
    path = Path(path)
    modules: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in _load_tensors(path).items():
        try:
            part, flat, name = parse_key(key)
        except UnknownKey as unknown:
            raise CheckpointError(f"{path}: key {key!r} {unknown.reason}") from None
        found = modules.setdefault((part, flat), {})
        if name in found:
            raise CheckpointError(f"{path}: key {key!r} adapts the same module as {found[name][0]!r}; keep one of them")
        _check_tensor(path, key, name, tensor)
        found[name] = (key, tensor)
    _add_metadata_alphas(path, modules)
    updates = {}
    for module, found in modules.items():
        try:
            updates[module] = _module_update(path, Tensors(found))
        except BadTensors as bad:
            raise CheckpointError(f"{path}: key {bad.key!r} {bad.reason}") from None
    return updates


def _add_metadata_alphas(path: Path, modules: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]]) -> None:
    """The alpha of each LoRA module of a diffusers / peft layout from peft's config in the file's metadata
    (``ldm.adapters.peft_metadata``), written as the alpha that gives its scale at the module's rank."""
    configs = peft_configs(path)
    for (part, _), found in modules.items():
        if part not in configs or "lora_down.weight" not in found or "alpha" in found:
            continue
        key, down = found["lora_down.weight"]
        located = diffusers_module_path(key)
        if located is not None:
            alpha = configs[part].scale(located[1]) * down.shape[0]
            found["alpha"] = (f"{key} (alpha from {part}'s lora_adapter_metadata)", torch.tensor(alpha))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise InputError(f"LoRA path {path} is a folder, not a LoRA file; give the .safetensors file in it")
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist; check the path")
    tensors = _pickled_tensors(path) if path.suffix.lower() in PICKLED_SUFFIXES else _safetensors(path)
    if not tensors:
        raise CheckpointError(f"LoRA file {path} holds no tensors; it is empty")
    return tensors


PICKLED_SUFFIXES = (".pt", ".ckpt", ".bin")  # torch.save files: read with weights_only (no code runs)


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read LoRA file {path} ({error}); it must be a .safetensors file") from None


def _pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA saved with ``torch.save``: a dict of tensors, loaded with ``weights_only=True``."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read LoRA file {path} as a torch file of tensors ({first})") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise CheckpointError(f"LoRA file {path} is not a dict of named tensors; save it as .safetensors")
    return loaded


def _check_tensor(path: Path, key: str, name: str, tensor: torch.Tensor) -> None:
    """Floating point and finite; alpha is checked where it is read."""
    if name == "alpha":
        return
    if not tensor.is_floating_point():
        raise CheckpointError(f"{path}: key {key!r} holds {tensor.dtype} values, not floating-point weights")
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: key {key!r} holds NaN or infinite values; the file is broken")


def _module_update(path: Path, tensors: Tensors) -> ModuleUpdate:
    """The one kind a module's tensor names make, read with its alpha and DoRA magnitude."""
    kinds = [kind for kind, names in KINDS.items() if any(name in tensors for name in names)]
    if not kinds:
        raise BadTensors(tensors.any_key(), "has no adapter weights beside it (only alpha or DoRA); the file is incomplete")
    if len(kinds) > 1:
        other = next(name for name in KINDS[kinds[1]] if name in tensors)
        raise BadTensors(tensors.key(other), f"is a {kinds[1]} tensor beside {kinds[0]} tensors; a module takes one kind of adapter")
    kind = kinds[0]
    alpha = _alpha(path, tensors) if "alpha" in tensors else None
    magnitudes = [name for name in DORA_TENSORS if name in tensors]
    if kind in ("full diff", "norm diff"):
        for extra in [name for name in ("alpha", *magnitudes) if name in tensors]:
            raise BadTensors(tensors.key(extra), f"is beside a {kind}, which takes no {extra}; remove it")
        update: Update = Difference.read(tensors, kind)
    else:
        update = {"LoRA": LoRA, "LoHa": LoHa, "LoKr": LoKr}[kind].read(tensors, alpha)
    if len(magnitudes) > 1:
        raise BadTensors(tensors.key(magnitudes[1]), f"adapts the same module as {tensors.key(magnitudes[0])!r}; keep one of them")
    magnitude = (tensors.key(magnitudes[0]), tensors.get(magnitudes[0])) if magnitudes else None
    return ModuleUpdate(update, update.shape(tensors), magnitude, tensors.any_key())


def _alpha(path: Path, tensors: Tensors) -> float:
    key, tensor = tensors.key("alpha"), tensors.get("alpha")
    # A boolean would pass as 1.0; it is a writer's bug, not a strength.
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise BadTensors(key, f"holds a {tensor.dtype} alpha; it must be one real number")
    if tensor.numel() != 1:
        raise BadTensors(key, f"holds {tensor.numel()} values; alpha must be one number")
    alpha = float(tensor)
    if not math.isfinite(alpha):
        raise BadTensors(key, f"is alpha = {alpha}; it must be a finite number")
    return alpha


def check_scale(scale: float, path: str | os.PathLike) -> float:
    """An adapter's strength must be a finite number: NaN or infinity would turn every image into NaN."""
    return checks.finite(scale, f"the LoRA scale for {path}")


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
