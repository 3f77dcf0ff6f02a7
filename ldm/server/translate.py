"""A request's JSON fields -> the ``GenerationSettings`` the CLI and Python build, and a job's results -> A1111's JSON.

Only translation: each default and check of a setting stays in ``ldm.settings``; this module adds
the server's limits (``Limits``) and A1111's names. A bad value is a ``SettingError`` whose
placeholders are ldm's field names or the request's own keys; ``label`` words each as the JSON key
a client sent (``num_inference_steps`` -> ``steps``), so a 422 names the field to fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image

from ldm import __version__, checks
from ldm.errors import InputError, SettingError
from ldm.images import GenerationParameters, format_parameters, open_image, parameters_chunk, to_rgb
from ldm.inpainting import FILLS, Inpaint
from ldm.random import resolve_seed
from ldm.server.catalog import ModelEntry
from ldm.server.config import Limits
from ldm.server.controlnet import control_units
from ldm.server.jobs import Job, JobRequest
from ldm.server.names import resolve_sampler, schedule_label
from ldm.server.schema import GenerationFields
from ldm.settings import DEFAULT_SCHEDULER, GenerationSettings

# The JSON key of each GenerationSettings field (and scheduler option) whose key is not its name.
LABELS = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images_per_prompt": "batch_size",
    "scheduler": "sampler_name",
    "sigma_schedule": "scheduler",
    "use_karras_sigmas": "scheduler",
    "use_exponential_sigmas": "scheduler",
    "strength": "denoising_strength",
    "init_image": "init_images",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "max_pixels": "--max-pixels",
    "hires_scale": "hr_scale",
    "hires_steps": "hr_second_pass_steps",
    "hires_strength": "denoising_strength",
    "hires_upscaler": "hr_upscaler",
    "inpaint": "mask",
    "refiner": "refiner_checkpoint",
    "refiner_switch": "refiner_switch_at",
}
# Fields that would change the image in ways ldm cannot do yet: (field, the value that asks for it).
UNSUPPORTED = (
    ("restore_faces", "face restoration"),
    ("tiling", "tiling"),
    ("script_name", "scripts"),
)


def label(field: str) -> str:
    return LABELS.get(field, field)


def worded(error: Exception) -> str:
    """An error's message, a ``SettingError``'s with the JSON keys a client sends."""
    return error.worded(label) if isinstance(error, SettingError) else str(error)


class ModelNotFound(LookupError):
    """A model name that is not in the server's listing (a 404)."""


@dataclass(frozen=True)
class ServerDefaults:
    """What the server's options set for requests that do not say (A1111's /options), and its models."""

    clip_skip: int | None = None  # diffusers' meaning: A1111's CLIP_stop_at_last_layers - 1
    find_model: Callable[[str], ModelEntry | None] = lambda name: None  # a listed model by name (Catalog.find_model)
    loras_dir: Path | None = None  # where the prompt's <lora:NAME:WEIGHT> tags find their files (--loras-dir)
    controlnet_dir: Path | None = None  # the ControlNets alwayson_scripts.controlnet units name (--controlnet-dir)


def job_request(body: GenerationFields, limits: Limits, defaults: ServerDefaults, img2img: bool, can_save: bool) -> JobRequest:
    """The job a request asks for, checked; ``SettingError`` (422) or ``SamplerNotFound`` (400) otherwise."""
    refuse_unsupported(body, can_save)
    init_image = init_image_of(body.init_images) if img2img or body.init_images else None
    if img2img and init_image is None:
        raise SettingError("{init_images} is empty; img2img needs one base64 image")
    check_limits(body, limits, init_image)
    scheduler, sigma_schedule = resolve_sampler(body.sampler_name or body.sampler_index or DEFAULT_SCHEDULER, body.scheduler)
    settings = GenerationSettings(
        prompt=body.prompt, negative_prompt=body.negative_prompt, num_inference_steps=body.steps,
        guidance_scale=body.cfg_scale, width=body.width, height=body.height, num_images_per_prompt=body.batch_size,
        scheduler=scheduler, sigma_schedule=sigma_schedule, eta=eta_for(scheduler, body.eta),
        init_image=init_image, strength=body.denoising_strength if init_image is not None else None,
        clip_skip=clip_skip_of(body.override_settings or {}, defaults),
        subseed=body.subseed, subseed_strength=body.subseed_strength,
        control=control_units(body.alwayson_scripts, defaults.controlnet_dir, decode_image),
        **hires_fields(body, limits),
        inpaint=inpaint_of(body),
        **refiner_fields(body, defaults),
    )
    from ldm.adapters.folder import prompt_loras
    from ldm.schedulers import check_options

    check_options(settings.scheduler, settings.scheduler_options())
    prompt_loras(defaults.loras_dir, settings.lora_tags())  # a tag the folder lacks is a 422 now, not a failed job
    n_iter = checks.check_count(body.n_iter, "n_iter")
    seed = resolve_seed(body.seed, settings.batch * n_iter)
    overrides = body.override_settings or {}
    model = model_of(overrides, defaults)
    restore = body.override_settings_restore_afterwards
    subseed = resolve_seed(body.subseed, settings.batch * n_iter, "subseed") if body.subseed_strength else None
    return JobRequest(replace(settings, seed=seed, subseed=subseed), n_iter, body.save_images, model, restore)


def refuse_unsupported(body: GenerationFields, can_save: bool) -> None:
    for name, what in UNSUPPORTED:
        if getattr(body, name, None):
            raise SettingError(f"{{{name}}} asks for {what}, which ldm does not do yet; leave it out")
    if body.seed_resize_from_h > 0 or body.seed_resize_from_w > 0:
        raise SettingError("{seed_resize_from_h} / {seed_resize_from_w} (noise made at another size) is not supported; leave them -1")
    if body.save_images and not can_save:
        raise SettingError("{save_images}: this server writes no files; start it with --outputs DIR, or leave it false")


def check_limits(body: GenerationFields, limits: Limits, init_image: Image.Image | None) -> None:
    """The server's limits: steps, images per request, prompt length, pixels per batch."""
    if body.steps is not None and not 1 <= checks.integer(body.steps, "steps") <= limits.max_steps:
        raise SettingError(f"{{steps}} must be from 1 to {limits.max_steps} on this server (--max-steps), got {body.steps}")
    count = checks.check_count(body.batch_size, "batch_size") * checks.check_count(body.n_iter, "n_iter")
    if count > limits.max_images:
        raise SettingError(f"{{batch_size}} x {{n_iter}} = {count} images is over this server's limit of {limits.max_images}")
    for name in ("prompt", "negative_prompt"):
        length = len(getattr(body, name))
        if length > limits.max_prompt_chars:
            raise SettingError(f"{{{name}}} has {length} characters, over this server's limit of {limits.max_prompt_chars}")
    width, height = body.width, body.height
    if init_image is not None:
        width, height = width or init_image.width // 8 * 8, height or init_image.height // 8 * 8
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            checks.check_side(side, name)
    if width is not None and height is not None and width * height * body.batch_size > limits.max_pixels:
        raise SettingError(
            f"{{width}} x {{height}} x {{batch_size}} = {width * height * body.batch_size} pixels per batch is over "
            f"this server's limit of {limits.max_pixels} (--max-pixels); make the images smaller or fewer"
        )


def hires_fields(body: GenerationFields, limits: Limits) -> dict[str, Any]:
    """A1111's hires fix (``enable_hr`` and its ``hr_*`` fields) as the settings' ``hires_*``, its size within the
    server's limit; what ldm's hires pass cannot do (its own prompt, sampler or model; a target size) is refused."""
    if not getattr(body, "enable_hr", False):
        return {}
    for name in ("hr_resize_x", "hr_resize_y", "firstphase_width", "firstphase_height"):
        if getattr(body, name, 0):
            raise SettingError(f"{{{name}}} (a hires target size) is not supported; give {{hr_scale}} instead")
    sampler = body.sampler_name or body.sampler_index
    for name, same in (("hr_prompt", body.prompt), ("hr_negative_prompt", body.negative_prompt),
                       ("hr_sampler_name", sampler), ("hr_checkpoint_name", "Use same checkpoint")):  # fmt: skip
        if getattr(body, name, None) not in ("", None, same, "Use same sampler"):  # A1111's page sends "Use same ..."
            raise SettingError(f"{{{name}}}: the hires pass uses the first pass's; leave it out")
    scale = checks.finite(body.hr_scale, "hr_scale")
    if body.width and body.height and int(body.width * scale) * int(body.height * scale) * body.batch_size > limits.max_pixels:
        raise SettingError(
            f"{{hr_scale}} {scale:g} makes {int(body.width * scale)} x {int(body.height * scale)} x {{batch_size}} pixels per batch, "
            f"over this server's limit of {limits.max_pixels} (--max-pixels); lower it"
        )
    return dict(hires_scale=scale, hires_steps=body.hr_second_pass_steps, hires_strength=body.denoising_strength, hires_upscaler=body.hr_upscaler)


def eta_for(scheduler: str, eta: float | None) -> float | None:
    """``eta`` for a scheduler that takes it; A1111 ignores it for the others, and so does ldm."""
    from ldm.schedulers import SCHEDULERS

    return eta if eta is not None and "eta" in {f.name for f in fields(SCHEDULERS[scheduler].Options)} else None


def clip_skip_of(overrides: dict[str, Any], defaults: ServerDefaults) -> int | None:
    """diffusers' clip skip from A1111's ``CLIP_stop_at_last_layers`` (1 = the last layer), else the server's."""
    clip_skip = requested_clip_skip(overrides, defaults)
    # A1111's sdxl_clip_l_skip is off by default, and SDXL then ignores clip skip (ldm.server.engine); on, it skips
    # layers of CLIP ViT-L alone, which ldm cannot. Without a clip skip it changes nothing on any model.
    if overrides.get("sdxl_clip_l_skip") is True and clip_skip:
        raise SettingError(
            "{override_settings.sdxl_clip_l_skip}: clip skip on SDXL's CLIP ViT-L alone is not supported; leave it off "
            "(A1111's default, with which SDXL ignores clip skip)"
        )
    return clip_skip


def requested_clip_skip(overrides: dict[str, Any], defaults: ServerDefaults) -> int | None:
    layers = overrides.get("CLIP_stop_at_last_layers")
    if layers is None:
        return defaults.clip_skip
    layers = checks.integer(layers, "override_settings.CLIP_stop_at_last_layers")
    if layers < 1:
        raise SettingError(f"{{override_settings.CLIP_stop_at_last_layers}} must be 1 or more, got {layers}")
    return layers - 1 or None


def model_of(overrides: dict[str, Any], defaults: ServerDefaults) -> ModelEntry | None:
    """The listed model ``override_settings.sd_model_checkpoint`` names (None: the loaded one); ``ModelNotFound`` else."""
    name = overrides.get("sd_model_checkpoint")
    if name is None:
        return None
    model = defaults.find_model(str(name))
    if model is None:
        raise ModelNotFound(f"model {str(name)!r} not found; GET /sdapi/v1/sd-models lists the models")
    return model


def refiner_fields(body: GenerationFields, defaults: ServerDefaults) -> dict[str, Any]:
    """A1111's SDXL refiner: ``refiner_checkpoint`` names a listed model (empty or "None": no refiner, and then
    ``refiner_switch_at`` does nothing, as in A1111); ``ModelNotFound`` for a name the models folder lacks."""
    name = body.refiner_checkpoint
    if name is None or name.strip() in ("", "None"):
        return {}
    model = defaults.find_model(name)
    if model is None:
        raise ModelNotFound(f"refiner_checkpoint {name!r} not found; GET /sdapi/v1/sd-models lists the models")
    return {"refiner": str(model.path), "refiner_switch": body.refiner_switch_at}


def inpaint_of(body: GenerationFields) -> Inpaint | None:
    """A1111's inpainting fields as an ``Inpaint``; None without a ``mask``. A field left out (None) takes ldm's default."""
    if not body.mask:
        return None
    options: dict[str, Any] = {"mask_blur": mask_blur_of(body), "inpaint_full_res": body.inpaint_full_res}
    options["inpaint_full_res_padding"] = body.inpaint_full_res_padding
    if body.inpainting_fill is not None:
        fill = checks.integer(body.inpainting_fill, "inpainting_fill")
        if not 0 <= fill < len(FILLS):
            raise SettingError(f"{{inpainting_fill}} must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), got {fill}")
        options["inpainting_fill"] = FILLS[fill]
    if body.inpainting_mask_invert is not None:
        invert = checks.integer(body.inpainting_mask_invert, "inpainting_mask_invert")
        if invert not in (0, 1):
            raise SettingError(f"{{inpainting_mask_invert}} must be 0 (inpaint masked) or 1 (inpaint not masked), got {invert}")
        options["inpainting_mask_invert"] = bool(invert)
    mask = open_base64_image(body.mask, "mask")  # as it is: a transparent mask's alpha is the mask
    return Inpaint(mask=mask, **{name: value for name, value in options.items() if value is not None})


def mask_blur_of(body: GenerationFields) -> int | None:
    """A1111's ``mask_blur``, else its ``mask_blur_x`` / ``mask_blur_y`` (which ldm takes only when equal)."""
    if body.mask_blur is not None:
        return body.mask_blur
    x, y = getattr(body, "mask_blur_x", None), getattr(body, "mask_blur_y", None)
    if x != y:
        raise SettingError("{mask_blur_x} and {mask_blur_y} differ, but ldm blurs the mask alike both ways; give {mask_blur}")
    return x


def init_image_of(images: list[str] | None) -> Image.Image | None:
    if not images:
        return None
    if len(images) > 1:
        raise SettingError(f"{{init_images}} holds {len(images)} images; ldm takes one per request")
    return decode_image(images[0], "init_images")


def decode_base64(text: str, field: str) -> bytes:
    """The bytes of base64 ``text``, with or without a ``data:image/...;base64,`` prefix."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SettingError(f"{{{field}}} is not valid base64") from None


def decode_image(text: str, field: str) -> Image.Image:
    """A base64 image (``decode_base64``) as upright RGB; a 422 naming ``field`` if it is not an image."""
    return to_rgb(open_base64_image(text, field))


def open_base64_image(text: str, field: str) -> Image.Image:
    """A base64 image decoded as it is (its text chunks kept), with ``ldm.images.open_image``'s checks."""
    data = decode_base64(text, field)
    try:
        return open_image(io.BytesIO(data))
    except InputError:
        raise SettingError(f"{{{field}}} is not an image ldm can read (PNG, JPEG, WebP, ...) or has too many pixels") from None


# --- results -> JSON -------------------------------------------------------------------------------


def png_base64(image: Image.Image, params: GenerationParameters) -> str:
    """``image`` as a base64 PNG carrying its infotext (A1111's ``parameters`` chunk)."""
    return base64.b64encode(png_bytes(image, params)).decode("ascii")


def png_bytes(image: Image.Image, params: GenerationParameters | None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=parameters_chunk(params) if params is not None else None)
    return buffer.getvalue()


def info_json(job: Job, body: GenerationFields, model_name: str, model_hash: str | None) -> str:
    """A1111's ``info``: a JSON string of what made the images (``Processed.js()``); the model is the one that
    made them (``model_name`` / ``model_hash``: the loaded one's, for a job stopped before its first image)."""
    s, seeds = job.request.settings, job.request.seeds
    first = job.parameters[0] if job.parameters else None
    prompts = [p for p in s.prompt for _ in range(s.num_images_per_prompt)] * job.request.n_iter
    negatives = [n for n in s.negative_prompt for _ in range(s.num_images_per_prompt)] * job.request.n_iter
    subseed = s.subseed if s.subseed is not None else seeds[0] if body.subseed == -1 else body.subseed
    info = {
        "prompt": prompts[0], "all_prompts": prompts, "negative_prompt": negatives[0], "all_negative_prompts": negatives,
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseed, "all_subseeds": [subseed + i for i in range(len(seeds))],
        "subseed_strength": body.subseed_strength,
        "width": first.width if first else body.width, "height": first.height if first else body.height,
        "sampler_name": first.sampler if first else body.sampler_name, "scheduler": schedule_label(s.sigma_schedule),
        "cfg_scale": first.cfg_scale if first else body.cfg_scale, "steps": first.steps if first else body.steps,
        "batch_size": s.num_images_per_prompt, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.model if first else model_name,
        "sd_model_hash": first.extra.get("Model hash") if first else model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": s.strength or s.hires_strength,
        "extra_generation_params": dict(first.extra) if first else {}, "index_of_first_image": 0,
        "infotexts": [format_parameters(p) for p in job.parameters], "styles": body.styles or [],
        "job_timestamp": job.created, "clip_skip": (s.clip_skip or 0) + 1, "is_using_inpainting_conditioning": job.inpainting_conditioning,
        "version": f"ldm {__version__}",
    }
    return json.dumps(info)


def png_info(text: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(items, parameters) of a PNG's ``parameters`` text, as A1111's /png-info answers them."""
    if not text:
        return {}, {}
    from ldm.images import parse_parameters

    try:
        p = parse_parameters(text)
    except InputError:
        return {"parameters": text}, {}
    parameters = {
        "Prompt": p.prompt, "Negative prompt": p.negative_prompt, "Steps": p.steps, "Sampler": p.sampler,
        "CFG scale": p.cfg_scale, "Seed": p.seed, "Size-1": p.width, "Size-2": p.height, "Model": p.model, **p.extra,
    }
    return {"parameters": text}, parameters
