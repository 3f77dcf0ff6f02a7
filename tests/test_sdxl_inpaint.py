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
from test_inpaint import box_mask, init_image, pixels
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
    reference = diffusers.StableDiffusionXLInpaintPipeline(**base.components)
    reference.set_progress_bar_config(disable=True)
    return reference, Pipeline.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    return _models(tmp_path_factory, 9)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return _models(tmp_path_factory, 4)


@pytest.mark.parametrize("model", ["inpainting_model", "plain_model"])
@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("euler-ancestral", 0.75)])
def test_a_batch_matches_diffusers_sdxl_inpainting_image_by_image(request, model, sampler, strength):
    reference, pipe, _ = request.getfixturevalue(model)
    reference.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(tiny_sdxl.scheduler().config)
    image, mask = init_image(), box_mask()
    ours = pipe(
        **COMMON, init_image=image, mask=Inpaint(mask=mask, mask_blur=0), strength=strength, num_inference_steps=4,
        scheduler=sampler, seed=30, num_images_per_prompt=2, output_type="np",
    )  # fmt: skip
    inside = (np.asarray(mask) >= 128)[..., None]
    for i in range(2):
        theirs = reference(
            **COMMON, image=image, mask_image=mask, strength=strength, num_inference_steps=4, height=64, width=64,
            generator=torch.Generator("cpu").manual_seed(30 + i), output_type="np",
        ).images[0]  # fmt: skip
        assert np.abs(ours.images[i] - np.where(inside, theirs, pixels(image))).max() < TOLERANCE, i
    assert np.abs(ours.images[0] - pixels(image))[inside[..., 0]].max() > 0.05  # the box was repainted


def test_only_masked_matches_diffusers_padding_mask_crop(plain_model):
    """"Inpaint area: only masked": the box generated at width x height, whose size the micro-conditioning reads
    (diffusers' add_time_ids with padding_mask_crop), scaled back and pasted (the same pixels, to 8-bit rounding)."""
    reference, pipe, _ = plain_model
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(tiny_sdxl.scheduler().config)
    image, mask = init_image(96, 80), box_mask((30, 20, 50, 36), (96, 80))
    last = {}

    def grab(_, i, t, tensors):
        last["theirs"] = tensors["latents"]
        return tensors

    theirs = reference(
        **COMMON, image=image, mask_image=mask, width=64, height=64, padding_mask_crop=6, strength=0.9,
        num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(3), callback_on_step_end=grab,
    ).images[0]  # fmt: skip
    options = Inpaint(mask=mask, mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=6)
    ours = pipe(
        **COMMON, init_image=image, mask=options, width=64, height=64, strength=0.9, num_inference_steps=4, seed=3,
        scheduler="euler", callback=lambda i, t, x, x0: last.update(ours=x),
    ).images[0]  # fmt: skip
    assert (last["ours"] - last["theirs"]).abs().max() < TOLERANCE
    assert ours.size == theirs.size == (96, 80)
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(ours)[outside], np.asarray(image)[outside])


def test_txt2img_on_an_sdxl_inpainting_model_is_inpainting_with_an_all_white_mask(inpainting_model):
    """As A1111 runs it: the whole image masked, the masked image grey."""
    from PIL import Image

    _, pipe, _ = inpainting_model
    call = dict(**COMMON, num_inference_steps=3, scheduler="euler-ancestral", seed=4, output_type="np", height=64, width=64)
    plain = pipe(**call).images
    masked = pipe(**call, init_image=init_image(), mask=Inpaint(mask=Image.new("L", (64, 64), 255), mask_blur=0), strength=1.0).images
    assert np.abs(plain - masked).max() < 1e-6
    assert np.abs(plain - pixels(init_image())).max() > 0.05


def test_an_sdxl_inpainting_single_file_loads_and_inpaints_from_the_command_line(inpainting_model, tmp_path, capsys):
    """sd_xl_base_1.0_inpainting_0.1.safetensors's layout: the base's keys with a 9-channel conv_in; the CLI's image
    is the Python call's."""
    from PIL import Image

    from ldm.cli import main
    from ldm.loading import load_components, save_single_file

    _, pipe, folder = inpainting_model
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
