"""Merging checkpoints tensor by tensor: weighted sum, add difference, and LoRAs baked in (``ldm merge``).

The two recipes of AUTOMATIC1111's checkpoint merger (``modules/extras.py``, ``run_modelmerger``), per
tensor of the merged networks, in float32:

- weighted sum: (1 − a)·A + a·B, computed as A + a·(B − A) (``torch.lerp``, A1111's form);
- add difference: A + a·(B − C) (C is usually the base model B was fine-tuned from).

Adapters (``--lora FILE:SCALE``) are then applied to the result as ``Adapters.load(..., fuse=True)``
would: each module's W + s·ΔW (DoRA: its decomposition) by ``ldm.adapters``, in the order given,
mapped onto the single file's keys through ``ldm.loading.keymap``.

Inputs are original single files; the output is keyed as A. The merge streams: headers are read and
every key and shape checked first, then each output tensor is read from the inputs, computed and
written before the next (``SafetensorsStream`` reads without memory maps, so a ``.safetensors`` merge
holds a few tensors at a time whatever the model size; ``.ckpt`` inputs are memory-mapped by torch and
their pages stay resident while the merge runs). Tensors of networks not merged, integer buffers and
what is no network's (EMA copies, schedule buffers) are copied from A.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ldm import checks
from ldm.adapters.apply import Target, place
from ldm.adapters.files import check_scale, read_adapter
from ldm.adapters.keys import TEXT_PARTS
from ldm.errors import CheckpointError, InputError
from ldm.io import atomic_write
from ldm.loading import keymap
from ldm.loading.components import build_networks, build_text_encoder_2, shapes_of
from ldm.loading.detect import detect
from ldm.loading.single_file import IGNORED_PREFIXES, SUFFIXES, file_configs
from ldm.loading.sources import SAFETENSORS_SUFFIXES, SafetensorsStream, TensorFile
from ldm.loading.writers import write_safetensors_streamed

Method = Literal["weighted-sum", "add-difference"]
METHODS: dict[str, int] = {"weighted-sum": 2, "add-difference": 3}  # method -> number of models
# part -> the file's prefixes of its tensors; "text_encoder": SD's text encoder, or both of SDXL's (its conditioner).
PARTS = {
    "unet": (keymap.UNET_PREFIX,),
    "text_encoder": ("cond_stage_model.", keymap.SDXL_CONDITIONER_PREFIX),
    "vae": (keymap.VAE_PREFIX,),
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "an SDXL refiner"}


@dataclass(frozen=True)
class MergeRecipe:
    """What ``merge`` makes: ``models`` A[, B[, C]], ``method`` with ``alpha`` over ``parts``, then ``loras``."""

    models: tuple[Path, ...]
    method: Method | None = None  # None: only LoRAs (one model)
    alpha: float = 0.5
    parts: tuple[str, ...] = ("unet",)
    loras: tuple[tuple[Path, float], ...] = ()
    dtype: torch.dtype | None = None  # of the output's floating-point tensors; None: A's

    def __post_init__(self):
        checks.finite(self.alpha, "alpha")
        for path, scale in self.loras:
            check_scale(scale, path)
        if self.method is None:
            if len(self.models) != 1 or not self.loras:
                raise InputError("give --method with two (weighted-sum) or three (add-difference) models, or one model and --lora")
        elif METHODS[self.method] != len(self.models):
            raise InputError(f"{self.method} merges {METHODS[self.method]} models, got {len(self.models)}")
        unknown = [part for part in self.parts if part not in PARTS]
        if unknown or not self.parts:
            raise InputError(f"--parts {','.join(self.parts)}: choose from {', '.join(PARTS)}")


def _open(path: Path) -> SafetensorsStream | TensorFile:
    if path.is_dir():
        raise InputError(f"{path} is a folder; ldm merge reads single files: ldm convert {path} {path.name}.safetensors first")
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    return SafetensorsStream(path) if path.suffix in SAFETENSORS_SUFFIXES else TensorFile(path)


def _names(source) -> dict[str, str]:
    """Normalized key -> the file's key (early SD 1.x files leave ``text_model.`` out)."""
    return {keymap.normalize_single_file_key(key): key for key in source.shapes}


def _dtype(source, key: str) -> torch.dtype:
    return source.dtypes[key] if isinstance(source, SafetensorsStream) else source.read(key).dtype


def _merged_part(key: str, parts: Sequence[str]) -> bool:
    return not key.startswith(IGNORED_PREFIXES) and any(key.startswith(PARTS[part]) for part in parts)


def check_inputs(recipe: MergeRecipe, sources: list, names: list[dict[str, str]]) -> dict[str, str]:
    """Every merged tensor of A exists in B (and C) with A's shape, and B (C) merge nothing A lacks; returns the
    family of A. One line naming the key otherwise."""
    families = []
    for path, source, own in zip(recipe.models, sources, names):
        try:
            found = detect({name: source.shapes[key] for name, key in own.items()}, {}, None, lambda _: None, "epsilon")
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        families.append(found)
    first = recipe.models[0]
    for path, found in zip(recipe.models[1:], families[1:]):
        if found.family != families[0].family:
            raise CheckpointError(f"{first} is {FAMILY_NAMES[families[0].family]} but {path} is {FAMILY_NAMES[found.family]}; merge models of one family")
    if recipe.method is not None:
        a_names, a = names[0], sources[0]
        for path, source, own in zip(recipe.models[1:], sources[1:], names[1:]):
            for name, key in a_names.items():
                if not _merged_part(name, recipe.parts) or not _dtype(a, key).is_floating_point:
                    continue
                if name not in own:
                    raise CheckpointError(f"{path} has no {name}, which {first} has; the models differ in architecture")
                if source.shapes[own[name]] != a.shapes[key]:
                    raise CheckpointError(
                        f"{name} is {list(a.shapes[key])} in {first} but {list(source.shapes[own[name]])} in {path}; "
                        "the models differ in architecture"
                    )
            extra = sorted(n for n in own if _merged_part(n, recipe.parts) and n not in a_names)
            if extra:
                raise CheckpointError(f"{path} has {extra[0]}, which {first} lacks; the models differ in architecture")
    return families[0]


@dataclass
class _Patch:
    """The adapter updates of one original tensor: per diffusers tensor it holds, (target, scale, is bias) in order."""

    entry: keymap.Entry
    diffusers_shapes: dict[str, tuple[int, ...]]
    updates: dict[str, list[tuple[Target, float, bool]]] = field(default_factory=dict)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        pieces = keymap.to_diffusers(self.entry, tensor, self.diffusers_shapes)
        for name, updates in self.updates.items():
            value = pieces[name]
            for target, scale, is_bias in updates:
                # Target.apply maps (weight, bias) together; only diffs change a bias, and neither half of
                # theirs depends on the other, so the half not produced here is a stand-in of zeros.
                module = target.module
                if is_bias:
                    value = target.apply(torch.zeros(tuple(module.weight.shape)), value, scale)[1]
                else:
                    bias = None if module.bias is None else torch.zeros(tuple(module.bias.shape))
                    value = target.apply(value, bias, scale)[0]
            pieces[name] = value
        return keymap.to_original(self.entry, pieces)


def lora_patches(recipe: MergeRecipe, family: str, a, a_names: dict[str, str]) -> dict[str, _Patch]:
    """File key of A -> its adapter updates, for every tensor the recipe's LoRAs change. The modules are those
    of A's networks as ``load_components`` builds them (on the meta device: no weights)."""
    if not recipe.loras:
        return {}
    file_shapes = {name: a.shapes[key] for name, key in a_names.items()}
    configs, _ = file_configs(a, file_shapes, lambda name: a.read(a_names[name]), family, None, "epsilon")
    unet, _, text_encoder = build_networks(configs.unet, configs.vae, configs.text)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": build_text_encoder_2(configs.text_2)}
    entries = {"unet": {d: e for e in keymap.unet_entries(shapes_of(unet)) for d in e.diffusers}}
    for slot, part in enumerate(TEXT_PARTS):
        if models[part] is not None:
            entries[part] = {d: e for e in keymap.text_entries(shapes_of(models[part]), family, slot) for d in e.diffusers}
    shapes = {part: shapes_of(model) for part, model in models.items() if model is not None}
    patches: dict[str, _Patch] = {}
    for path, scale in recipe.loras:
        for (part, module_path), target in place(models, path, read_adapter(path)).items():
            changed = [(f"{module_path}.weight", False)]
            if getattr(target.update, "bias", None) is not None:
                changed.append((f"{module_path}.bias", True))
            for name, is_bias in changed:
                entry = entries[part][name]
                patch = patches.setdefault(a_names[entry.original], _Patch(entry, shapes[part]))
                patch.updates.setdefault(name, []).append((target, scale, is_bias))
    return patches


def merge(recipe: MergeRecipe, out: str | os.PathLike) -> Path:
    """Write the merge of ``recipe`` to ``out``: a ``.safetensors`` file in A's layout, or a diffusers folder
    (any name without a single-file suffix). Atomic; an existing ``out`` is refused."""
    out = Path(out)
    if out.exists():
        raise InputError(f"{out} already exists; ldm merge never overwrites, choose a new name")
    if out.suffix == ".ckpt":
        raise InputError(f"{out}: ldm merge writes .safetensors (streamed) or a diffusers folder; convert afterwards for a .ckpt")
    sources = [_open(Path(path)) for path in recipe.models]
    try:
        names = [_names(source) for source in sources]
        found = check_inputs(recipe, sources, names)
        patches = lora_patches(recipe, found.family, sources[0], names[0])
        if out.suffix in SUFFIXES:
            return atomic_write(out, lambda tmp: _write(recipe, sources, names, patches, tmp))
        return _write_folder(recipe, sources, names, patches, out)
    finally:
        for source in sources:
            if isinstance(source, SafetensorsStream):
                source.close()


def _write(recipe: MergeRecipe, sources: list, names: list[dict[str, str]], patches: dict[str, _Patch], path: Path) -> None:
    a = sources[0]
    back = {key: name for name, key in names[0].items()}
    specs = {}
    for key, shape in a.shapes.items():
        dtype = _dtype(a, key)
        out_dtype = recipe.dtype if recipe.dtype is not None and dtype.is_floating_point else dtype
        specs[key] = torch.empty(shape, dtype=out_dtype, device="meta")

    def produce(key: str) -> torch.Tensor:
        value = a.read(key)
        name = back[key]
        if recipe.method is not None and value.is_floating_point() and _merged_part(name, recipe.parts):
            value = value.float()
            b = sources[1].read(names[1][name]).float()
            if recipe.method == "weighted-sum":
                value = torch.lerp(value, b, recipe.alpha)  # (1 - a)·A + a·B
            else:
                value = value + recipe.alpha * (b - sources[2].read(names[2][name]).float())  # A + a·(B - C)
        if key in patches:
            value = patches[key].apply(value.float())
        return value.to(specs[key].dtype).contiguous()

    write_safetensors_streamed(path, specs, produce, _metadata(recipe, a))


def _metadata(recipe: MergeRecipe, a) -> dict[str, str]:
    """A's metadata (its configuration and prediction type), less hashes of A's own bytes, plus the recipe."""
    kept = {k: v for k, v in a.metadata.items() if not k.startswith(("sshs_", "modelspec.hash"))}
    recipe_record = {
        "models": [Path(path).name for path in recipe.models],
        "method": recipe.method,
        "alpha": recipe.alpha if recipe.method else None,
        "parts": list(recipe.parts) if recipe.method else [],
        "loras": [[Path(path).name, scale] for path, scale in recipe.loras],
    }
    return {**kept, "format": "pt", "ldm.merge_recipe": json.dumps(recipe_record, sort_keys=True)}


def _write_folder(recipe: MergeRecipe, sources: list, names: list, patches: dict, out: Path) -> Path:
    """The merge as a single file in a hidden temporary beside ``out``, converted to a diffusers folder (the folder's
    weights are read from the memory-mapped file: one model's worth), then removed."""
    from ldm.loading import load_components, save_diffusers

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".safetensors", dir=out.parent)
    os.close(fd)
    try:
        _write(recipe, sources, names, patches, Path(tmp))
        return save_diffusers(load_components(tmp), out)
    finally:
        Path(tmp).unlink(missing_ok=True)

