"""End-to-end parity: a random-weight SD-shaped model saved in the diffusers layout, loaded by ldm,
gives the images diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline give for the
same prompt, negative prompt, seed, steps, guidance and sampler (max abs difference < 1e-4 in
[0, 1] pixels), with every sampler swapped in as diffusers' documentation does it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import diffusers_pipeline

from ldm.pipeline import Pipeline
from ldm.pipeline.stages import build_scheduler
from ldm.settings import GenerationSettings

TOLERANCE = 1e-4
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry, dark", guidance_scale=7.5, output_type="np")


# The released scheduler configs, verbatim (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1):
# they leave out timestep_spacing (and SD 1.5 prediction_type), which each sampler then fills with
# its own diffusers default. save_pretrained would write every key and hide that.
RELEASED_SCHEDULER_CONFIGS = {
    "sd1": {
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False,
    },
    "sd2": {
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    },
}

# Every sampler ldm names, with the diffusers class and options a diffusers user swaps in for it
# (``Class.from_config(pipe.scheduler.config, **options)``) and the call arguments both take.
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}, {}),
    "ddim-eta": ("DDIMScheduler", {}, {"eta": 0.6}),
    "ddpm": ("DDPMScheduler", {}, {}),
    "dpm-solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {}, {}),
    "dpm-solver++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    "dpm-solver++-exponential": ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, {}),
    "euler-exponential": ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, {}),
    "dpm-solver++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, {}),
    "unipc": ("UniPCMultistepScheduler", {}, {}),
    "lcm": ("LCMScheduler", {}, {}),
}


def ours_for(sampler: str) -> dict:
    """ldm's call arguments for a SAMPLERS entry."""
    name, options = sampler, dict(SAMPLERS[sampler][2])
    for suffix in ("-eta", "-karras", "-exponential"):
        name = name.removesuffix(suffix)
    if sampler.endswith(("-karras", "-exponential")):
        options[f"use_{sampler.rsplit('-', 1)[1]}_sigmas"] = True
    return {"scheduler": name, **options}


def swap_scheduler(reference, sampler: str) -> dict:
    """Swap the loaded scheduler the way diffusers' docs do; returns the extra call arguments.

    Always from the model's own scheduler: the module's tests share one reference pipeline, and a
    swap from a swapped scheduler would inherit the options passed to the earlier one.
    """
    import diffusers

    class_name, options, call = SAMPLERS[sampler]
    reference.scheduler = getattr(diffusers, class_name).from_config(reference.loaded_scheduler.config, **options)
    return call


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp(request.param) / "model"
    diffusers_pipeline(request.param).save_pretrained(folder)
    config = json.dumps(RELEASED_SCHEDULER_CONFIGS[request.param], indent=2)
    (folder / "scheduler" / "scheduler_config.json").write_text(config)
    (folder / "model_index.json").write_text(
        (folder / "model_index.json").read_text().replace('"DDIMScheduler"', f'"{RELEASED_SCHEDULER_CONFIGS[request.param]["_class_name"]}"')
    )
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert type(reference.scheduler).__name__ == RELEASED_SCHEDULER_CONFIGS[request.param]["_class_name"]
    reference.loaded_scheduler = reference.scheduler
    return reference, Pipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    ("sampler", "points"),
    [("dpm-solver++", {"timesteps": [999, 850, 600, 400, 200, 50]}), ("euler", {"sigmas": [14.6, 6.0, 2.5, 1.0, 0.3, 0.0]})],
)
def test_a_runs_own_timesteps_or_sigmas_match_diffusers(models, sampler, points):
    reference, pipe = models
    swap_scheduler(reference, sampler)
    theirs = reference(**COMMON, **points, height=64, width=64, generator=torch.Generator("cpu").manual_seed(7)).images
    ours = pipe(**COMMON, **points, scheduler=sampler, height=64, width=64, seed=7)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    steps = 6 if "timesteps" in points else 5  # sigmas include the end of the run
    assert ours.settings.settings.num_inference_steps == steps
    default = pipe(**COMMON, scheduler=sampler, num_inference_steps=steps, height=64, width=64, seed=7)
    assert np.abs(ours.images - default.images).max() > 1e-3  # the points were used


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_txt2img_matches_diffusers_after_its_scheduler_swap(models, sampler):
    reference, pipe = models
    call = swap_scheduler(reference, sampler)
    theirs = reference(
        **COMMON, **call, num_inference_steps=6, height=64, width=64, generator=torch.Generator("cpu").manual_seed(1234)
    ).images
    ours = pipe(**COMMON, **ours_for(sampler), num_inference_steps=6, height=64, width=64, seed=1234)
    assert ours.seeds == [1234]
    assert np.abs(ours.images - theirs).max() < TOLERANCE


def test_samplers_start_where_diffusers_starts_them(models):
    """The defect this guards: DPM-Solver, Euler and UniPC on "leading" spacing (t = 901 for 10 steps)."""
    import diffusers

    reference, pipe = models
    for name, class_name in (("dpm-solver++", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")):
        theirs = getattr(diffusers, class_name).from_config(reference.loaded_scheduler.config)
        theirs.set_timesteps(10)
        ours = build_scheduler(pipe.scheduler_config, GenerationSettings("", scheduler=name), None)
        ours.set_timesteps(10)
        assert torch.allclose(ours.timesteps.double(), theirs.timesteps.double()), name
        assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    first = {}
    for name in ("dpm-solver++", "ddim"):
        sampler = build_scheduler(pipe.scheduler_config, GenerationSettings("", scheduler=name), None)
        sampler.set_timesteps(10)
        first[name] = int(sampler.timesteps[0])
    assert first == {"dpm-solver++": 999, "ddim": 901}


def test_batch_matches_diffusers_with_one_generator_per_image(models):
    reference, pipe = models
    swap_scheduler(reference, "ddim")
    generators = [torch.Generator("cpu").manual_seed(s) for s in (50, 51)]
    kwargs = dict(num_inference_steps=4, height=64, width=64, num_images_per_prompt=2)
    theirs = reference(**COMMON, **kwargs, generator=generators).images
    ours = pipe(**COMMON, **kwargs, scheduler="ddim", seed=50).images
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_lcm_batch_matches_diffusers_and_each_image_is_its_seeds_single_image(models):
    """LCM draws fresh noise after every step but the last: per image, from that image's generator."""
    reference, pipe = models
    swap_scheduler(reference, "lcm")
    generators = [torch.Generator("cpu").manual_seed(s) for s in (60, 61)]
    kwargs = dict(num_inference_steps=4, height=64, width=64)
    theirs = reference(**COMMON, **kwargs, num_images_per_prompt=2, generator=generators).images
    ours = pipe(**COMMON, **kwargs, scheduler="lcm", num_images_per_prompt=2, seed=60).images
    assert np.abs(ours - theirs).max() < TOLERANCE
    second = pipe(**COMMON, **kwargs, scheduler="lcm", seed=61).images
    assert np.abs(ours[1:] - second).max() < TOLERANCE
    assert np.abs(ours[:1] - second).max() > 1e-3  # the seeds differ, and so do the images


@pytest.mark.parametrize(("steps", "guidance_scale"), [(1, 0.0), (2, 1.0), (4, 0.0)])
def test_the_sd_turbo_recipe_matches_diffusers(models, steps, guidance_scale):
    """SD-Turbo's few-step sampling: Euler ancestral on trailing timesteps, guidance off (<= 1)."""
    from diffusers import EulerAncestralDiscreteScheduler

    reference, pipe = models
    loaded = reference.loaded_scheduler.config
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(loaded, timestep_spacing="trailing")
    kwargs = dict(prompt="a photo of a red cat", guidance_scale=guidance_scale, num_inference_steps=steps, output_type="np")
    kwargs.update(height=64, width=64)
    theirs = reference(**kwargs, generator=torch.Generator("cpu").manual_seed(3)).images
    ours = pipe(**kwargs, scheduler="euler-ancestral", timestep_spacing="trailing", seed=3)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    assert not ours.settings.settings.guided
    leading = pipe(**kwargs, scheduler="euler-ancestral", timestep_spacing="leading", seed=3)
    assert np.abs(ours.images - leading.images).max() > 1e-3  # the spacing was used


def test_a_diffusers_scheduler_object_can_drive_our_pipeline(models):
    from diffusers import HeunDiscreteScheduler

    reference, pipe = models
    reference.scheduler = HeunDiscreteScheduler.from_config(reference.loaded_scheduler.config)
    kwargs = dict(num_inference_steps=4, height=64, width=64)
    theirs = reference(**COMMON, **kwargs, generator=torch.Generator("cpu").manual_seed(8)).images
    scheduler = HeunDiscreteScheduler.from_config(reference.loaded_scheduler.config)
    ours = pipe(**COMMON, **kwargs, scheduler=scheduler, seed=8).images
    assert np.abs(ours - theirs).max() < TOLERANCE


def init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    array = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255)
    return Image.fromarray(array.astype(np.uint8))


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++", "euler", "lcm"])
def test_img2img_matches_diffusers(models, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    reference, pipe = models
    call = swap_scheduler(reference, sampler)
    img2img = StableDiffusionImg2ImgPipeline(**reference.components)
    theirs = img2img(
        **COMMON, **call, image=init_image(), strength=0.6, num_inference_steps=6, generator=torch.Generator("cpu").manual_seed(77)
    ).images
    ours = pipe(**COMMON, **ours_for(sampler), init_image=init_image(), strength=0.6, num_inference_steps=6, seed=77)
    assert ours.images.shape == (1, 64, 64, 3)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
