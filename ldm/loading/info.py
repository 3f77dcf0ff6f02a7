"""What a model file or folder is, from its keys, shapes, configs and metadata, without building networks.

``describe(path)`` (``ldm info``) recognises an original single-file checkpoint, a diffusers folder, an
adapter (LoRA and kin, ``ldm.adapters.summary``), a VAE or TAESD, and a textual-inversion embedding.
A ``.safetensors`` file is read from its header (plus one small tensor where a rule needs it); a
``.ckpt`` / ``.pt`` is memory-mapped with ``torch.load(weights_only=True)``. Anything else is a one-line
``CheckpointError`` naming what was found.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ldm.adapters.keys import KOHYA_PREFIXES
from ldm.adapters.summary import adapter_summary, is_adapter
from ldm.errors import CheckpointError, LdmError
from ldm.loading import keymap
from ldm.loading.configs import folder_configs
from ldm.loading.controlnet import DIFFUSERS_HINT_KEY, file_config, file_prefix_and_shapes, is_controlnet_file
from ldm.loading.detect import EDM_KEYS, V_PRED_KEY, ZERO_SNR_KEY, detect_family, detect_prediction_type
from ldm.loading.diffusers_folder import is_diffusers_folder
from ldm.loading.hashes import legacy_hash, sha256, tensors_sha256
from ldm.loading.sources import TensorFile, TensorSource, open_component
from ldm.loading.vae_files import find_vae
from ldm.models.controlnet import ControlNetConfig

FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
PARTS = {"unet": keymap.UNET_PREFIX, "vae": keymap.VAE_PREFIX, "text_encoder": "cond_stage_model."}
# SDXL's text encoders, by family: the file's prefix of each network ldm names.
SDXL_PARTS = {
    family: {name: place.prefix for name, place in zip(("text_encoder", "text_encoder_2"), slots) if place is not None}
    for family, slots in keymap.TEXT_SLOTS.items()
    if family.startswith("sdxl")
}
# What ldm does with each SDXL family's models (fine-tuning the refiner is not built).
SUPPORT = {
    "sdxl": "generates (txt2img, img2img, inpainting, hires fix, ControlNet, with a refiner), loads, converts, merges and "
    "fine-tunes (U-Net or LoRA)",
    "sdxl-refiner": "refines a base's latents and generates img2img, loads, converts and merges; finetune not built",
}
UNKNOWN_PREDICTION = "unknown (pass --prediction-type)"


def describe(path: str | Path, hashes: bool = True) -> dict:
    """A JSON-ready description of ``path``; ``hashes`` also hashes files (read once, then cached)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        if is_diffusers_folder(path):
            return _folder(path)
        config = _folder_config(path)
        return _controlnet_folder(path, config) if config.get("_class_name") == "ControlNetModel" else _vae_folder(path)
    file = TensorFile(path)
    keys = set(file.shapes)
    if keymap.is_whole_model(keys) or any(key.startswith("conditioner.embedders.") for key in keys):
        return _checkpoint(path, file, hashes)
    if is_adapter(keys) or any(key.startswith(tuple(KOHYA_PREFIXES)) for key in keys):  # the latter: to say what is wrong
        return {"path": str(path), **adapter_summary(path, file, hashes)}
    if keymap.vae_layout(keys) is not None:
        return _vae_file(path, file, hashes)
    if is_controlnet_file(keys):
        return _controlnet_file(path, file, hashes)
    if keys in ({"emb_params"}, {"clip_l", "clip_g"}):
        return _embedding(path, file, hashes)
    example = sorted(keys)[0]
    raise CheckpointError(
        f"{path} is none of what ldm reads ({len(keys)} tensors, e.g. {example!r}): not an SD 1.x/2.x/XL checkpoint, "
        "adapter, ControlNet, VAE or embedding"
    )


def _checkpoint(path: Path, file: TensorFile, hashes: bool) -> dict:
    shapes = {keymap.normalize_single_file_key(key): shape for key, shape in file.shapes.items()}
    found = {"path": str(path), "what": "checkpoint", "layout": "original single file"}
    try:
        family = detect_family(shapes)
    except LdmError as error:
        family = None
        found["family"] = f"unknown ({error})"
    if family is not None:
        found["family"] = FAMILIES[family]
        found["prediction_type"] = _prediction(family, shapes, file)
        found.update(_noise_schedule(shapes, file))
        found.update({"ldm": SUPPORT[family]} if family in SUPPORT else {})
    found["dtypes"] = _dtypes(file, file.shapes)
    parts = PARTS
    if family in SDXL_PARTS:  # SDXL's text encoders sit under conditioner.embedders.N.
        parts = {"unet": PARTS["unet"], "vae": PARTS["vae"], **SDXL_PARTS[family]}
    found["parameters"] = _parameters(file.shapes, parts)
    found["metadata"] = {k: v for k, v in file.metadata.items() if k.startswith(("modelspec.", "ldm.", "sd_merge", "ss_"))}
    if hashes:
        found["hashes"] = _file_hashes(path)
    return found


def _json_object(text: str) -> dict:
    """``text`` parsed as a JSON object; {} for anything else."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _scheduler_metadata(file: TensorFile) -> dict:
    """The scheduler config ldm wrote into the file's metadata; {} where there is none (or it does not parse)."""
    return _json_object(file.metadata.get("ldm.scheduler_config", "{}"))


def _noise_schedule(shapes: dict, file: TensorFile) -> dict[str, str]:
    """A noise schedule other than SD's, and what says so (docs/loading.md); nothing for SD's own."""
    edm = [key for key in EDM_KEYS if key in shapes]
    if edm:
        return {"noise_schedule": f"EDM ({edm[0]} key): ldm does not sample it yet"}
    zero_snr = _scheduler_metadata(file).get("rescale_betas_zero_snr")
    if zero_snr is not None:  # the file's scheduler config wins over the key, as when loading
        return {"noise_schedule": "zero terminal SNR (ldm.scheduler_config metadata)"} if zero_snr else {}
    return {"noise_schedule": f"zero terminal SNR ({ZERO_SNR_KEY} key)"} if ZERO_SNR_KEY in shapes else {}


def _prediction(family: str, shapes: dict, file: TensorFile) -> str:
    """The prediction type and the rule that gave it (docs/loading.md); SD 2.x files that do not say are a guess."""
    stated = _scheduler_metadata(file).get("prediction_type")
    if stated is not None:
        return f"{stated} (ldm.scheduler_config metadata)"
    if V_PRED_KEY in shapes or "modelspec.prediction_type" in file.metadata:
        marker = f"{V_PRED_KEY} key" if V_PRED_KEY in shapes else "modelspec.prediction_type metadata"
        return f"{detect_prediction_type(family, shapes, file.metadata, None, file.read)} ({marker})"
    if family != "sd2":
        return f"epsilon ({FAMILIES[family]})"
    if file.global_step is not None:
        return f"{detect_prediction_type(family, shapes, file.metadata, file.global_step, file.read)} (global_step {file.global_step})"
    guess = detect_prediction_type(family, shapes, {}, None, lambda key: file.read(key))
    return f"{UNKNOWN_PREDICTION}; ldm's guess from the weights: {guess}"


def _dtypes(source: TensorFile | TensorSource, keys) -> dict[str, int]:
    """How many tensors of each dtype (safetensors' names)."""
    return dict(sorted(Counter(source.dtype_name(key) for key in keys).items()))


def _parameters(shapes: dict[str, tuple[int, ...]], parts: dict[str, str]) -> dict[str, int]:
    """Numbers of values per part (by key prefix); what no part claims (EMA copies, schedule buffers) as ``other``."""
    counts = dict.fromkeys([*parts, "other"], 0)
    for key, shape in shapes.items():
        part = next((name for name, prefix in parts.items() if key.startswith(prefix) and not key.startswith("first_stage_model.loss.")), "other")
        counts[part] += math.prod(shape)
    return {part: count for part, count in counts.items() if count or part != "other"}


def _file_hashes(path: Path) -> dict[str, str]:
    """A1111's hashes of a file: the SHA-256 (Civitai's full hash), its first 10 digits (A1111's model hash, AutoV2),
    the old 8-digit hash, and for safetensors the start of the tensor bytes' SHA-256 (AutoV3)."""
    full = sha256(path)
    found = {"sha256": full, "autov2": full[:10], "legacy": legacy_hash(path)}
    if path.suffix == ".safetensors":
        found["autov3"] = tensors_sha256(path)[:12]
    return found


def _folder(path: Path) -> dict:
    found: dict = {"path": str(path), "what": "checkpoint", "layout": "diffusers folder"}
    family = None
    try:
        family = folder_configs(path).family
        found["family"] = FAMILIES[family]
        found.update({"ldm": SUPPORT[family]} if family in SUPPORT else {})
    except (OSError, ValueError, LdmError) as error:
        found["family"] = f"unknown ({str(error).splitlines()[0]})"
    scheduler = path / "scheduler" / "scheduler_config.json"
    try:
        found["prediction_type"] = json.loads(scheduler.read_text()).get("prediction_type", "epsilon") + " (scheduler config)"
    except (OSError, ValueError, AttributeError):
        found["prediction_type"] = UNKNOWN_PREDICTION
    found["parameters"], found["dtypes"] = {}, {}
    networks = (("unet", "diffusers"), ("vae", "diffusers"), ("text_encoder", "transformers"), ("text_encoder_2", "transformers"))
    for part, library in networks:
        if not (path / part).is_dir() and (part == "text_encoder_2" or family == "sdxl-refiner"):
            continue  # only SDXL has text_encoder_2/, and its refiner only that
        source = open_component(path / part, library)
        found["parameters"][part] = sum(math.prod(shape) for shape in source.shapes.values())
        for dtype, count in _dtypes(source, source.shapes).items():
            found["dtypes"][dtype] = found["dtypes"].get(dtype, 0) + count
    return found


def _folder_config(folder: Path) -> dict:
    """A model folder's ``config.json``; {} without one (or one that is not a JSON object)."""
    try:
        return _json_object((folder / "config.json").read_text())
    except OSError:
        return {}


def _controlnet_folder(path: Path, config: dict) -> dict:
    facts = _controlnet_facts(ControlNetConfig.from_diffusers(config))
    return {"path": str(path), "what": "ControlNet", "layout": "diffusers folder", **facts}


def _vae_folder(path: Path) -> dict:
    source = find_vae(path)  # a one-line error for a folder that holds no VAE either
    if source.kind == "folder":
        config = json.loads((path / "config.json").read_text())
        kind = {"AutoencoderTiny": "TAESD"}.get(config.get("_class_name"), "KL-VAE")
        return {"path": str(path), "what": "VAE", "kind": kind, "layout": "diffusers folder",
                "latent_channels": config.get("latent_channels")}  # fmt: skip
    return {"path": str(path), "what": "VAE", "kind": "TAESD", "files": [str(p) for p in source.paths]}


def _vae_file(path: Path, file: TensorFile, hashes: bool) -> dict:
    layout = keymap.vae_layout(set(file.shapes))
    found: dict = {"path": str(path), "what": "VAE"}
    if layout == "kl":
        prefix = keymap.VAE_PREFIX if any(k.startswith(keymap.VAE_PREFIX) for k in file.shapes) else ""
        found["kind"] = "KL-VAE"
        found["latent_channels"] = file.shapes[f"{prefix}quant_conv.weight"][0] // 2  # mean and log-variance
    else:
        found["kind"] = f"TAESD {layout.removeprefix('taesd-')}" if layout.startswith("taesd") else "KL-VAE (diffusers names)"
    found["dtypes"] = _dtypes(file, file.shapes)
    found["parameters"] = sum(math.prod(shape) for shape in file.shapes.values())
    if hashes:
        found["hashes"] = _file_hashes(path)
    return found


def _controlnet_file(path: Path, file: TensorFile, hashes: bool) -> dict:
    prefix, shapes = file_prefix_and_shapes(file, path)
    config = file_config(shapes, path)
    layout = "diffusers names" if DIFFUSERS_HINT_KEY in shapes else f"original (cldm{', ' + prefix + '*' if prefix else ''})"
    found = {"path": str(path), "what": "ControlNet", "layout": layout, **_controlnet_facts(config)}
    found["dtypes"] = _dtypes(file, [key for key in file.shapes if key.startswith(prefix)])
    found["parameters"] = sum(math.prod(shape) for shape in shapes.values())
    if hashes:
        found["hashes"] = _file_hashes(path)
    return found


def _controlnet_facts(config: ControlNetConfig) -> dict:
    """The base a ControlNet steers (from its text width and added conditioning) and its control image's channels."""
    unet = config.unet
    if unet.addition_embed_type == "text_time":
        family = "SDXL"
    else:
        width = unet.cross_attention_dim
        family = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"SD 1.x/2.x-shaped (text width {width})")
    return {"family": family, "conditioning_channels": config.conditioning_channels, "levels": len(unet.block_out_channels)}


def _embedding(path: Path, file: TensorFile, hashes: bool) -> dict:
    shapes = {key: list(shape) for key, shape in file.shapes.items()}
    found: dict = {"path": str(path), "what": "embedding"}
    if "emb_params" in shapes:
        vectors, width = shapes["emb_params"]
        found.update(vectors=vectors, width=width, family={768: "SD 1.x", 1024: "SD 2.x"}.get(width, "unknown"))
    else:
        found.update(vectors=shapes["clip_l"][0], family="SDXL", widths={key: shapes[key][1] for key in ("clip_l", "clip_g")})
    if hashes:
        found["hashes"] = _file_hashes(path)
    return found
