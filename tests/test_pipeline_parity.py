"""End-to-end parity: a random-weight SD-shaped model saved in the diffusers layout, loaded by ldm,
gives the images diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline give for the
same prompt, negative prompt, seed, steps and guidance (max abs difference < 1e-4 in [0, 1] pixels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import diffusers_pipeline  # noqa: E402

from ldm.pipeline import Pipeline  # noqa: E402

TOLERANCE = 1e-4
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry, dark", guidance_scale=7.5, output_type="np")


def diffusers_scheduler(name: str, config):
    """diffusers' scheduler ``name`` on the folder's noise process.

    ``from_config`` gives a class its own default for keys the source config only
    defaulted (DPM-Solver and Euler default to "linspace" spacing, DDIM to "leading"),
    while ldm reads the spacing written in the folder; pin it so both run the same grid.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm-solver++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    return classes[name].from_config(config, timestep_spacing=config["timestep_spacing"])


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tmp_path_factory):
    reference = diffusers_pipeline(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    reference.save_pretrained(folder)
    return reference, Pipeline.from_pretrained(folder)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++"])
def test_txt2img_matches_diffusers(models, scheduler):
    reference, pipe = models
    reference.scheduler = diffusers_scheduler(scheduler, reference.scheduler.config)
    theirs = reference(
        **COMMON, num_inference_steps=6, height=64, width=64, generator=torch.Generator("cpu").manual_seed(1234)
    ).images
    ours = pipe(**COMMON, num_inference_steps=6, height=64, width=64, scheduler=scheduler, seed=1234)
    assert ours.seeds == [1234]
    assert np.abs(ours.images - theirs).max() < TOLERANCE


def test_batch_matches_diffusers_with_one_generator_per_image(models):
    reference, pipe = models
    reference.scheduler = diffusers_scheduler("ddim", reference.scheduler.config)
    generators = [torch.Generator("cpu").manual_seed(s) for s in (50, 51)]
    kwargs = dict(num_inference_steps=4, height=64, width=64, num_images_per_prompt=2)
    theirs = reference(**COMMON, **kwargs, generator=generators).images
    ours = pipe(**COMMON, **kwargs, scheduler="ddim", seed=50).images
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_a_diffusers_scheduler_object_can_drive_our_pipeline(models):
    reference, pipe = models
    reference.scheduler = diffusers_scheduler("euler", reference.scheduler.config)
    kwargs = dict(num_inference_steps=4, height=64, width=64)
    theirs = reference(**COMMON, **kwargs, generator=torch.Generator("cpu").manual_seed(8)).images
    scheduler = diffusers_scheduler("euler", reference.scheduler.config)
    ours = pipe(**COMMON, **kwargs, scheduler=scheduler, seed=8).images
    assert np.abs(ours - theirs).max() < TOLERANCE


def init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    array = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255)
    return Image.fromarray(array.astype(np.uint8))


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++"])
def test_img2img_matches_diffusers(models, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    reference, pipe = models
    img2img = StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = diffusers_scheduler(scheduler, reference.scheduler.config)
    theirs = img2img(
        **COMMON, image=init_image(), strength=0.6, num_inference_steps=6, generator=torch.Generator("cpu").manual_seed(77)
    ).images
    ours = pipe(**COMMON, init_image=init_image(), strength=0.6, num_inference_steps=6, scheduler=scheduler, seed=77)
    assert ours.images.shape == (1, 64, 64, 3)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
