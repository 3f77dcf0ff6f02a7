"""Hires fix: A1111's second txt2img pass (``StableDiffusionProcessingTxt2Img.sample_hr_pass``) as a stage.

    first pass at width x height -> upscale -> img2img at ``hires_size`` with ``hires_strength`` -> decode

The upscale is in latent space (``Latent*``: torch's ``interpolate`` of the scaled latents with A1111's
``latent_upscale_modes``) or in pixel space (``Lanczos``: the first pass's images decoded to 8 bits,
resized with PIL's Lanczos and encoded again, as A1111 does and as diffusers' img2img reads a PIL
image). The second pass is the img2img path of ``ldm.pipeline.stages`` fed with those latents or
images: a second ``Call`` at the larger size whose schedule has ``hires_steps`` steps (0: the first
pass's count), of which the last ``hires_strength`` run, as img2img runs them. Its noise comes from
each image's seed again (A1111 makes a new ``ImageRNG`` from the seeds for the pass), so image i of a
batch still equals a single image made with seed s + i; a caller's own generators go on drawing. The
prompt is the first pass's (A1111's ``hr_prompt`` defaults to it), and so are the sampler and its options.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ldm import checks
from ldm.errors import SettingError
from ldm.guidance import Conditioning
from ldm.images import image_to_tensor, to_pil
from ldm.pipeline import control, sdxl, stages
from ldm.pipeline.inpaint import takes_mask
from ldm.random import seed_generators
from ldm.settings import LATENT_UPSCALERS

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline


def check(pipe: Pipeline, call: stages.Call) -> None:
    """Refuse a hires pass that could not run, before any network runs: its size and its steps."""
    s = call.settings
    if s.hires_scale is None:
        return
    if takes_mask(pipe):
        raise SettingError("{hires_scale} runs a second pass that an inpainting model (9 input channels) cannot take yet; drop it")
    width, height = s.hires_size(pipe.vae.config.downsample_factor)
    checks.check_pixels(width, height, s.batch, pipe.setup.max_pixels)
    limit = pipe.scheduler_config.num_train_timesteps
    checks.check_steps(s.hires_pass_steps, "hires_steps", limit=limit)
    if s.hires_schedule_steps > limit:
        raise SettingError(
            f"{{hires_steps}} {s.hires_pass_steps} at {{hires_strength}} {s.hires_strength:g} spread over {s.hires_schedule_steps} "
            f"steps, more than the model's {limit}; lower the steps or raise the strength"
        )
    order = getattr(getattr(call.scheduler, "diffusers", None), "order", 1)  # a diffusers template's calls per step
    if order > 1:
        raise SettingError(
            "the hires pass is img2img, which needs a scheduler with one network call per step; this {scheduler} "
            f"({type(call.scheduler.diffusers).__name__}) makes {order}: use one of ldm's samplers"
        )


def encodes_again(pipe: Pipeline, call: stages.Call) -> bool:
    """Whether the pass lays prompt editing or alternation out over steps of its own, so encodes the prompts again."""
    s = call.settings
    if s.hires_scale is None or s.hires_pass_steps == s.num_inference_steps:
        return False
    plan = stages.prompt_plan(pipe, replace(s, num_inference_steps=s.hires_pass_steps))
    # Texts that do not change between steps serve any number of steps (the last row repeats).
    return (call.plan.scheduled or plan.scheduled) and plan != call.plan


def second_pass(
    pipe: Pipeline, call: stages.Call, x: torch.Tensor, text: Conditioning, callback: stages.StepCallback | None
) -> torch.Tensor:
    """The hires pass over the first pass's latents ``x``: the larger latents (``x`` itself without the pass)."""
    s = call.settings
    if s.hires_scale is None:
        return x
    again = encodes_again(pipe, call)
    second = second_call(pipe, call, x)
    if again:  # prompt editing laid out over the pass's own steps
        text = stages.encode_prompts(pipe, second)
    else:
        text = sdxl.at_size(pipe, text, second.settings)
    timesteps = stages.prepare_timesteps(pipe, second)
    x = stages.initial_latents(pipe, second, timesteps)
    return stages.denoise(pipe, second, x, timesteps, text, counted_on(callback, s.num_inference_steps))


def second_call(pipe: Pipeline, call: stages.Call, x: torch.Tensor) -> stages.Call:
    """The hires pass as an img2img call: the upscaled latents (or images) at the larger size, fresh generators."""
    s, f = call.settings, pipe.vae.config.downsample_factor
    width, height = s.hires_size(f)
    shape = (x.shape[0], x.shape[1], height // f, width // f)
    latents = images = None
    if s.hires_upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[s.hires_upscaler]
        latents = F.interpolate(x, size=shape[-2:], mode=mode, antialias=antialias)
    else:
        images = upscaled_images(pipe, x, width, height)
    # The pass's settings name its input as init_image (diffusers' img2img takes images or latents as
    # ``image``); the stages read the Call's ``init`` / ``init_latents``.
    # The pass runs its hires_pass_steps steps, all of them (A1111's rule, settings.hires_schedule_steps), at the
    # end of a longer schedule; its prompt editing is laid out over the steps it runs, as A1111 lays it.
    second = replace(
        s, width=width, height=height, num_inference_steps=s.hires_schedule_steps,
        init_image=latents if images is None else images, strength=s.hires_strength,
        hires_scale=None, hires_steps=0, hires_strength=None, hires_upscaler=None,
    )  # fmt: skip
    # The first pass's scheduler is the template: the same rule, config and options, with fresh state.
    plain = replace(second, eta=None, timestep_spacing=None, sigma_schedule="spaced")
    scheduler = stages.build_scheduler(pipe.scheduler_config, plain, call.scheduler)
    _, variation = stages.variation_generators(s)
    plan = stages.prompt_plan(pipe, replace(second, num_inference_steps=s.hires_pass_steps))
    return stages.Call(
        replace(call.resolved, settings=second), scheduler, fresh_generators(call), shape, images, None, plan, call.loras,
        variation, control=control.prepare(pipe, second), init_latents=latents, kept_steps=s.hires_pass_steps,
    )  # fmt: skip


def fresh_generators(call: stages.Call) -> stages.Generators:
    """Each image's generator seeded again from its seed, as A1111 seeds the hires pass; the caller's own
    generators (seeds unknown) as they are, so that they go on drawing."""
    seeds = call.resolved.seeds
    return call.generators if seeds is None else [seed_generators(seed, 1)[0] for seed in seeds]


def upscaled_images(pipe: Pipeline, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The first pass's images as 8-bit images resized with Lanczos (A1111's ``resize_image``), (B, 3, H, W) in [-1, 1]."""
    return torch.cat([image_to_tensor(image, width, height) for image in to_pil(stages.decode(pipe, x))])


def counted_on(callback: stages.StepCallback | None, first: int) -> stages.StepCallback | None:
    """``callback`` with the pass's steps numbered after the first pass's ``first`` steps (one progress count)."""
    if callback is None:
        return None

    def after_step(i: int, t: torch.Tensor, latents: torch.Tensor, denoised: torch.Tensor) -> None:
        callback(first + i, t, latents, denoised)

    return after_step
