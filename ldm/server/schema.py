"""The HTTP API's request and response models, typed, as A1111's ``modules/api/models.py`` declares its own.

Field names, defaults and response shapes are A1111's, so its clients work unchanged. Fields ldm has
no use for are accepted and ignored (``extra="allow"``, and the declared ones below that nothing
reads); the few that would change the image and that ldm cannot do yet (face restoration,
tiling, scripts, a hires pass with its own prompt, sampler or model) are refused by
``ldm.server.translate`` with a 422 naming the field. The native job API (``/ldm/v1``) takes the
same fields, with ``None`` meaning "the model's choice" where A1111 has a fixed default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationFields(BaseModel):
    """The fields of a generation request; ``None``: the model's recommendation or size, ldm's sampler."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    refiner_checkpoint: str | None = None  # SDXL: a model of the models folder that takes over at refiner_switch_at
    refiner_switch_at: float | None = None
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for sampler_name
    scheduler: str | None = None  # the schedule type: Automatic, Karras, Exponential
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    init_images: list[str] | None = None  # img2img: base64 images, with or without a data: URL prefix
    # Inpainting of the init image, A1111's fields; None: ldm's defaults (Img2ImgRequest declares A1111's).
    mask: str | None = None  # base64 image: white repaints (a transparent image: its opaque part)
    mask_blur: int | None = None
    inpainting_fill: int | None = None  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int | None = None
    inpainting_mask_invert: int | None = None


class Txt2ImgRequest(GenerationFields):
    """``POST /sdapi/v1/txt2img``, with A1111's defaults (StableDiffusionTxt2ImgProcessingAPI)."""

    sampler_index: str | None = "Euler"
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    enable_hr: bool = False
    denoising_strength: float | None = 0.75  # the hires pass's (A1111's API default; its web UI slider's is 0.7)
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img`` (StableDiffusionImg2ImgProcessingAPI)."""

    denoising_strength: float | None = 0.75
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    """txt2img and img2img: base64 PNGs (each with its infotext), the request, and ``info`` as a JSON string."""

    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class PNGInfoRequest(BaseModel):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int | None = None
    vectors: int | None = None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


# --- the native job API ----------------------------------------------------------------------------


class JobSubmitted(BaseModel):
    id: str
    state: str
    position: int | None
    url: str


class ImageParameters(BaseModel):
    """What made one image, as the request fields that make it again (the infotext, read for a client)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler_name: str
    scheduler: str | None = None  # the schedule type; None for a sampler that has none


class JobStatus(BaseModel):
    """A job as ``GET /ldm/v1/jobs/{id}`` and its server-sent events show it."""

    id: str
    state: str  # queued, running, done, failed, cancelled
    position: int | None = None  # jobs ahead of a queued one
    progress: float
    eta_relative: float
    batch: int  # the batch running, of n_iter
    n_iter: int
    step: int
    steps: int
    preview: str | None = None  # URL of the running batch's preview PNG
    images: list[str] = Field(default_factory=list)  # URLs of the images made
    seeds: list[int] = Field(default_factory=list)
    infotexts: list[str] = Field(default_factory=list)
    parameters: list[ImageParameters] = Field(default_factory=list)  # each image's, as request fields
    error: str | None = None
    created: float
    started: float | None = None
    finished: float | None = None


class JobList(BaseModel):
    jobs: list[JobStatus]
