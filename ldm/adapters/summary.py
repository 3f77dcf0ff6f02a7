"""What an adapter file holds, from its header: kinds, ranks, alphas, networks, kohya's metadata and hashes.

``ldm info`` shows it before a file is loaded. Only the header and the one-number alpha tensors are read;
``files.read_adapter`` checks every tensor when the adapter is applied.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ldm.adapters.files import DORA_TENSORS, KINDS
from ldm.adapters.keys import DIFFUSERS_PREFIXES, UnknownKey, parse_key
from ldm.errors import CheckpointError
from ldm.loading.hashes import sha256, tensors_sha256
from ldm.loading.sources import TensorFile

# The tensor whose first dimension is a module's rank, per kind, best first (LoKr: w2's rank wins, as in ``formats.LoKr``).
RANK_TENSORS = {
    "LoRA": ("lora_down.weight",),
    "LoHa": ("hada_w1_b",),
    "LoKr": ("lokr_w2_a", "lokr_w1_a"),
}
AUTOV3_DIGITS = 12  # A1111's LoRA hash, Civitai's "AutoV3": the start of tensors_sha256
METADATA_PREFIXES = ("ss_", "sshs_", "modelspec.")


def is_adapter(keys) -> bool:
    """True if every key places as an adapter tensor (kohya/LyCORIS or diffusers/peft layout)."""
    try:
        return bool(keys) and all(parse_key(key) for key in keys)
    except UnknownKey:
        return False


def adapter_summary(path: Path, file: TensorFile, hashes: bool = True) -> dict:
    """The summary of the adapter file ``path`` (opened as ``file``); ``hashes`` reads the whole file once (cached)."""
    modules: dict[tuple[str, str], dict[str, str]] = {}
    for key in file.shapes:
        try:
            part, flat, name = parse_key(key)
        except UnknownKey as unknown:
            raise CheckpointError(f"{path}: key {key!r} {unknown.reason}") from None
        modules.setdefault((part, flat), {})[name] = key
    kinds: Counter[str] = Counter()
    ranks: set[int] = set()
    alphas: set[float] = set()
    networks: Counter[str] = Counter()
    for (part, _), names in modules.items():
        kind = next((kind for kind, tensors in KINDS.items() if any(n in names for n in tensors)), "incomplete")
        kinds[f"DoRA ({kind})" if any(n in names for n in DORA_TENSORS) else kind] += 1
        networks[part] += 1
        rank_tensor = next((names[n] for n in RANK_TENSORS.get(kind, ()) if n in names), None)
        if rank_tensor is not None:
            ranks.add(file.shapes[rank_tensor][0])
        if "alpha" in names and file.shapes[names["alpha"]] in ((), (1,)):
            alphas.add(float(file.read(names["alpha"])))
    metadata = {key: value for key, value in file.metadata.items() if key.startswith(METADATA_PREFIXES)}
    layout = "diffusers/peft" if all(key.startswith(tuple(DIFFUSERS_PREFIXES)) for key in file.shapes) else "kohya/LyCORIS"
    summary = {
        "what": "adapter",
        "layout": layout,
        "kinds": dict(sorted(kinds.items())),
        "networks": dict(sorted(networks.items())),
        "ranks": sorted(ranks),
        # A file without alpha means alpha = rank (scale 1), as kohya, diffusers and ComfyUI read it.
        "alphas": sorted(alphas) if alphas else "none (alpha = rank)",
        "modules": len(modules),
        "metadata": metadata,
    }
    if hashes:
        summary["hashes"] = adapter_hashes(path, metadata)
    return summary


def adapter_hashes(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """A1111's LoRA hash (AutoV3; of a ``.safetensors`` file's tensor bytes, else the file's), the file's SHA-256,
    and whether a kohya ``sshs_model_hash`` agrees with the bytes."""
    full = sha256(path)
    tensors = tensors_sha256(path) if path.suffix == ".safetensors" else full
    found = {"autov3": tensors[:AUTOV3_DIGITS], "sha256": full}
    if "sshs_model_hash" in metadata:
        found["sshs_model_hash"] = "matches the tensors" if metadata["sshs_model_hash"] == tensors else "differs from the tensors"
    return found
