"""Inpainting on SDXL: an SDXL base (4-channel U-Net, blending) and an SDXL inpainting model (9 input channels)
against diffusers' StableDiffusionXLInpaintPipeline on the same random-weight models (tests/tiny_sdxl.py), as
tests/test_inpaint.py checks SD's: the same image, mask, prompt, seed, steps and sampler give the same image
(max abs difference < 1e-4 in [0, 1] pixels, fp32) once ldm's paste of the original outside the mask is applied
to diffusers' output."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import tiny_sdxl
import torch
from test_inpaint import (
    assert_a_batch_is_the_reference_image_by_image,
    assert_only_masked_is_padding_mask_crop,
    box_mask,
    init_image,
    inpainting_pair,
    pixels,
)
from test_training_support import one_torch_thread  # noqa: F401 - an autouse fixture: one torch thread per module

from ldm.inpainting import Inpaint
from ldm.pipeline import Pipeline

TOLERANCE = 1e-4
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=7.5)
SAMPLERS = {"euler": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler"}


def _models(tmp_path_factory, in_channels: int):
    base = tiny_sdxl.pipeline("base")
    base.unet = tiny_sdxl.unet("base", in_channels=in_channels)
    folder = tmp_path_factory.mktemp(f"sdxl-unet{in_channels}") / "model"
    base.save_pretrained(folder)
    return inpainting_pair(diffusers.StableDiffusionXLInpaintPipeline(**base.components), folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An SDXL inpainting model (9 input channels) and an SDXL base (4, inpainting by blending)."""
    return {"inpainting": _models(tmp_path_factory, 9), "plain": _models(tmp_path_factory, 4)}


@pytest.mark.parametrize("model", ["inpainting", "plain"])
@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("euler-ancestral", 0.75)])
def test_a_batch_matches_diffusers_sdxl_inpainting_image_by_image(models, model, sampler, strength):
    reference, pipe, _ = models[model]
    reference.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(tiny_sdxl.scheduler().config)
    assert_a_batch_is_the_reference_image_by_image(reference, pipe, sampler, strength)


def test_only_masked_matches_diffusers_padding_mask_crop(models):
    """"Inpaint area: only masked": the box generated at width x height, which the micro-conditioning reads (as
    diffusers' add_time_ids with padding_mask_crop), scaled back and pasted (the same pixels, to 8-bit rounding)."""
    reference, pipe, _ = models["plain"]
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(tiny_sdxl.scheduler().config)
    assert_only_masked_is_padding_mask_crop(reference, pipe, "euler")


def test_txt2img_on_an_sdxl_inpainting_model_is_inpainting_with_an_all_white_mask(models):
    """As A1111 runs it: the whole image masked, the masked image grey."""
    from PIL import Image

    _, pipe, _ = models["inpainting"]
    call = dict(**COMMON, num_inference_steps=3, scheduler="euler-ancestral", seed=4, output_type="np", height=64, width=64)
    plain = pipe(**call).images
    masked = pipe(**call, init_image=init_image(), mask=Inpaint(mask=Image.new("L", (64, 64), 255), mask_blur=0), strength=1.0).images
    assert np.abs(plain - masked).max() < 1e-6
    assert np.abs(plain - pixels(init_image())).max() > 0.05


def test_an_sdxl_inpainting_single_file_loads_and_inpaints_from_the_command_line(models, tmp_path, capsys):
    """sd_xl_base_1.0_inpainting_0.1.safetensors's layout: the base's keys with a 9-channel conv_in; the CLI's image
    is the Python call's."""
    from PIL import Image

    from ldm.cli import main
    from ldm.loading import load_components, save_single_file

    _, pipe, folder = models["inpainting"]
    single = save_single_file(load_components(folder), tmp_path / "sdxl-inpainting.safetensors")
    loaded = Pipeline.from_pretrained(single)
    assert loaded.unet.config.in_channels == 9 and loaded.text_encoder_2 is not None
    init_image().save(tmp_path / "init.png")
    box_mask().save(tmp_path / "mask.png")
    arguments = ["txt2img", "a photo of a red cat", "--model", str(single), "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--strength", "0.75", "--steps", "3",
                 "--scheduler", "euler", "--seed", "8", "--negative-prompt", "blurry", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(arguments) == 0, capsys.readouterr().err
    (written,) = (tmp_path / "out").glob("*.png")
    expected = pipe(
        **COMMON, init_image=init_image(), mask=Inpaint(mask=box_mask(), mask_blur=0), strength=0.75,
        num_inference_steps=3, scheduler="euler", seed=8,
    ).images[0]  # fmt: skip
    difference = np.abs(np.asarray(Image.open(written).convert("RGB"), dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_the_a1111_api_inpaints_with_an_sdxl_inpainting_model(models, tmp_path_factory):
    """/sdapi/v1/img2img with a mask on a listed SDXL inpainting model: it reads the mask (A1111's info says so),
    keeps the pixels the mask does not reach and repaints the box; the image is the Python call's."""
    import json

    from serving import decode_png, png_base64, post_once

    from ldm.loading import load_components, save_single_file
    from ldm.server.config import Limits, ServerConfig

    _, pipe, folder = models["inpainting"]
    root = tmp_path_factory.mktemp("serve-sdxl-inpaint")
    (root / "models").mkdir()
    save_single_file(load_components(folder), root / "models" / "sdxl-inpainting.safetensors")

    request = {
        "prompt": COMMON["prompt"], "negative_prompt": COMMON["negative_prompt"], "width": 64, "height": 64, "steps": 3,
        "cfg_scale": 7.5, "seed": 5, "sampler_name": "Euler", "init_images": [png_base64(init_image())], "mask": png_base64(box_mask()),
        "mask_blur": 0, "inpaint_full_res": False, "inpainting_fill": 1, "denoising_strength": 0.75,
        "override_settings": {"sd_model_checkpoint": "sdxl-inpainting"},
    }  # fmt: skip
    limits = Limits(max_pixels=64 * 64 * 4, max_steps=50, max_images=2, max_prompt_chars=200, max_body_bytes=256 * 1024)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(root / "cache"))
        config = ServerConfig(models_dir=root / "models", queue_size=2, limits=limits, device="cpu")
        answer = post_once(config, "/sdapi/v1/img2img", request)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["is_using_inpainting_conditioning"] is True
    served = np.asarray(decode_png(answer.json()["images"][0]).convert("RGB"), dtype=np.int16)
    expected = pipe(
        **COMMON, init_image=init_image(), mask=Inpaint(mask=box_mask(), mask_blur=0), strength=0.75,
        num_inference_steps=3, scheduler="euler", seed=5,
    ).images[0]  # fmt: skip
    difference = np.abs(served - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    outside = np.asarray(box_mask()) == 0
    assert np.array_equal(served[outside], np.asarray(init_image(), dtype=np.int16)[outside])


def test_a_controlnet_on_an_sdxl_inpainting_model_matches_diffusers_controlnet_inpainting(models, tmp_path):
    """The SDXL ControlNet reads the 4 latent channels while the 9-channel U-Net reads the mask and masked latents
    too: diffusers' StableDiffusionXLControlNetInpaintPipeline on the same weights."""
    from test_controlnet import control_image, random_controlnet

    from ldm.control import ControlUnit

    reference, pipe, _ = models["inpainting"]
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(tiny_sdxl.scheduler().config)
    random_controlnet(tiny_sdxl.unet("base"), seed=2).save_pretrained(tmp_path / "controlnet")
    net = diffusers.ControlNetModel.from_pretrained(tmp_path / "controlnet")
    image, mask, hint = init_image(), box_mask(), control_image(0, size=(64, 64))
    ours = pipe(
        **COMMON, init_image=image, mask=Inpaint(mask=mask, mask_blur=0), strength=1.0, num_inference_steps=3, scheduler="euler",
        seed=5, control=ControlUnit(model=str(tmp_path / "controlnet"), image=hint), output_type="np",
    ).images[0]  # fmt: skip
    theirs_pipe = diffusers.StableDiffusionXLControlNetInpaintPipeline(**reference.components, controlnet=net)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(
        **COMMON, image=image, mask_image=mask, control_image=hint, controlnet_conditioning_scale=1.0, strength=1.0,
        num_inference_steps=3, height=64, width=64, generator=torch.Generator("cpu").manual_seed(5), output_type="np",
    ).images[0]  # fmt: skip
    inside = (np.asarray(mask) >= 128)[..., None]
    assert np.abs(ours - np.where(inside, theirs, pixels(image))).max() < TOLERANCE
    plain = pipe(
        **COMMON, init_image=image, mask=Inpaint(mask=mask, mask_blur=0), strength=1.0, num_inference_steps=3, scheduler="euler",
        seed=5, output_type="np",
    ).images[0]  # fmt: skip
    assert np.abs(plain - ours).max() > 1e-3  # the ControlNet steered the repainted box
