"""The sd-webui-controlnet extension's API: ``alwayson_scripts.controlnet.args`` in a txt2img / img2img request,
``GET /controlnet/model_list`` and ``GET /controlnet/module_list``.

A request's units become ``ldm.control.ControlUnit``s (the CLI and Python build the same), each field
translated from the extension's names and defaults:

    enabled (true)            a disabled unit is left out
    module ("none")           "none" or "canny"; anything else is a 422 naming the field
    model                     a model of ``--controlnet-dir``: its title "name [hash]" or its name (any case)
    image / input_image       base64 (or {"image": base64}); a mask is refused (inpainting is not done here)
    weight (1)                ControlUnit.scale
    guidance_start/end (0/1)  ControlUnit.start / end
    control_mode (0)          0 / "Balanced", 1 / "My prompt is more important", 2 / "ControlNet is more important"
                              (the legacy ``guess_mode: true`` is 2)
    resize_mode (1)           0 / "Just Resize", 1 / "Crop and Resize" (the extension's default), 2 / "Resize and Fill"
    threshold_a/b (100/200)   canny's low and high thresholds
    processor_res, pixel_perfect, low_vram ...  accepted; ldm runs the preprocessor at the output size (Pixel Perfect)

A model is looked up in a listing of the folder, never by joining a client's text to a path. The listing
names each file as the extension does: its stem and A1111's old 8-digit hash (``ldm.loading.hashes.legacy_hash``);
a diffusers ControlNet folder by its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm import checks
from ldm.control import CANNY_THRESHOLDS, CONTROL_MODE_NAMES, RESIZE_MODE_NAMES, ControlUnit
from ldm.errors import SettingError, placeholder_text

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
MODULES = ("none", "canny")
# Keys that would change the image in a way ldm does not do: refused when set.
UNSUPPORTED = ("mask", "mask_image", "advanced_weighting", "inpaint_crop_input_image", "effective_region_mask")
# The ControlUnit field behind each of its errors' placeholders, as the request names it.
JSON_KEYS = {
    "control.model": "model", "control.image": "image", "control.preprocess": "module", "control.scale": "weight",
    "control.start": "guidance_start", "control.end": "guidance_end", "control.mode": "control_mode",
    "control.resize_mode": "resize_mode", "control.thresholds": "threshold_a / threshold_b",
}  # fmt: skip


def controlnet_models(folder: Path | None) -> dict[str, Path]:
    """The ControlNets of ``folder`` and its subfolders by title: ``"stem [hash]"`` for a file, the name for a
    diffusers folder; sorted by name (hidden files left out)."""
    from ldm.loading.hashes import legacy_hash

    if folder is None:
        return {}
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix in CONTROLNET_SUFFIXES:
            found[f"{path.stem} [{legacy_hash(path)}]"] = path
        elif path.is_dir() and (path / "config.json").is_file() and '"ControlNetModel"' in (path / "config.json").read_text():
            found[path.name] = path
    return found


def find_model(models: dict[str, Path], name: str) -> Path | None:
    """The model a request names: its title, or its name without the hash, in any case (as the extension finds it)."""
    if name in models:
        return models[name]
    wanted = name.split(" [")[0].lower()
    named = [path for title, path in models.items() if title.split(" [")[0].lower() == wanted]
    return named[0] if len(named) == 1 else None


def control_units(scripts: dict[str, Any], folder: Path | None, decode) -> tuple[ControlUnit, ...]:
    """The units of a request's ``alwayson_scripts`` (none without a ``controlnet`` entry). ``decode(text, field)``
    turns a base64 image into a PIL image (a 422 naming ``field`` when it is not one)."""
    entry = scripts.get("controlnet") if isinstance(scripts, dict) else None
    if entry is None:
        return ()
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list) or not all(isinstance(arg, dict) for arg in args):
        raise SettingError("{alwayson_scripts.controlnet.args} must be a list of unit objects (the extension's API)")
    models = controlnet_models(folder) if any(arg.get("enabled", True) for arg in args) else {}
    return tuple(unit(arg, i, models, folder, decode) for i, arg in enumerate(args) if arg.get("enabled", True))


def unit(arg: dict[str, Any], i: int, models: dict[str, Path], folder: Path | None, decode) -> ControlUnit:
    """One enabled unit of the request; its errors name the request's field."""
    field = f"alwayson_scripts.controlnet.args[{i}]"
    for key in UNSUPPORTED:
        if arg.get(key):
            raise SettingError(f"{{{field}.{key}}} is not supported by ldm's ControlNet; leave it out")
    module = arg.get("module") or "none"
    if module not in MODULES:
        raise SettingError(f"{{{field}.module}} {checks.shown(module)} is unknown; ldm has {', '.join(MODULES)} (GET /controlnet/module_list)")
    path = _model(arg.get("model"), models, folder, field)
    fields = dict(
        model=path, image=_image(arg, field, decode), preprocess=module, scale=arg.get("weight", 1.0),
        start=arg.get("guidance_start", 0.0), end=arg.get("guidance_end", 1.0), mode=_choice(arg, "control_mode", field),
        resize_mode=_choice(arg, "resize_mode", field),
    )  # fmt: skip
    if module == "canny":
        fields["thresholds"] = tuple(_threshold(arg.get(key), default) for key, default in zip(("threshold_a", "threshold_b"), CANNY_THRESHOLDS))
    try:
        return ControlUnit(**fields)
    except SettingError as error:
        raise SettingError(placeholder_text(error.worded(lambda name: f"{field}.{JSON_KEYS.get(name, name)}"))) from None


def _model(name: Any, models: dict[str, Path], folder: Path | None, field: str) -> Path:
    if folder is None:
        raise SettingError(f"{{{field}.model}}: this server has no ControlNets; start it with --controlnet-dir DIR")
    path = find_model(models, name) if isinstance(name, str) else None
    if path is None:
        raise SettingError(f"{{{field}.model}} {checks.shown(name)} is not in --controlnet-dir; GET /controlnet/model_list lists them")
    return path


def _image(arg: dict[str, Any], field: str, decode):
    key = "image" if arg.get("image") is not None else "input_image"
    value = arg.get(key)
    if isinstance(value, dict):
        if value.get("mask"):
            raise SettingError(f"{{{field}.{key}.mask}} (an inpainting mask) is not supported by ldm's ControlNet; leave it out")
        key, value = f"{key}.image", value.get("image")
    if not isinstance(value, str) or not value:
        raise SettingError(f"{{{field}.image}} is missing; give the unit's image as base64")
    return decode(value, f"{field}.{key}")


def _choice(arg: dict[str, Any], key: str, field: str) -> str:
    """``control_mode`` or ``resize_mode`` as the extension sends it (an index or its name) -> ldm's choice."""
    names = CONTROL_MODE_NAMES if key == "control_mode" else RESIZE_MODE_NAMES
    default = 2 if key == "control_mode" and arg.get("guess_mode") else 0 if key == "control_mode" else 1
    value = arg.get(key, default)
    choices = list(names)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    by_name = {label.lower(): choice for choice, label in names.items()} | {choice: choice for choice in choices}
    if isinstance(value, str) and value.lower() in by_name:
        return by_name[value.lower()]
    raise SettingError(f"{{{field}.{key}}} {checks.shown(value)} is unknown; give 0 to 2 or one of {', '.join(names.values())}")


def _threshold(value: Any, default: int) -> Any:
    """The extension sends -1 (or nothing) for "the module's default"; fractional values are rounded as it does."""
    if value is None or value == -1:
        return default
    return round(value) if isinstance(value, float) else value
