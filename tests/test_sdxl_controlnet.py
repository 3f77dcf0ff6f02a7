"""ControlNet on SDXL: an SDXL ControlNet (diffusers' ``ControlNetModel.from_unet`` of the tiny SDXL U-Net of
tests/tiny_sdxl.py, every weight moved off its init) steers ldm's SDXL pipeline as it steers diffusers'
``StableDiffusionXLControlNetPipeline``: it reads the rows' pooled text and micro-conditioning as the U-Net does
(max abs difference < 1e-4 in [0, 1] pixels, fp32), alone, in guess mode and within a start/end window."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import tiny_sdxl
import torch
from test_controlnet import assert_the_hires_pass_is, control_image, random_controlnet
from test_training_support import one_torch_thread  # noqa: F401 - an autouse fixture: one torch thread per module

from ldm.control import ControlUnit
from ldm.errors import ConfigError
from ldm.pipeline import Pipeline

TOLERANCE = 1e-4
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=7.5, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-controlnet")
    base = tiny_sdxl.pipeline("base")
    base.save_pretrained(root / "model")
    controlnet = random_controlnet(base.unet, seed=4)
    controlnet.save_pretrained(root / "cn")
    reference = diffusers.StableDiffusionXLControlNetPipeline(**base.components, controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    return reference, Pipeline.from_pretrained(root / "model"), root


@pytest.mark.parametrize(
    ("theirs_options", "ours_options"),
    [({}, {}), ({"guess_mode": True, "guidance_scale": 4.0}, {"mode": "controlnet"}),
     ({"control_guidance_start": 0.3, "control_guidance_end": 0.7}, {"start": 0.3, "end": 0.7})],
    ids=["balanced", "guess-mode", "start-end-window"],
)  # fmt: skip
def test_an_sdxl_controlnet_matches_diffusers(models, theirs_options, ours_options):
    reference, pipe, root = models
    image = control_image(1)
    theirs_options = dict(theirs_options)  # the parametrize dict is shared: pop from a copy
    call = {**COMMON, "guidance_scale": theirs_options.pop("guidance_scale", COMMON["guidance_scale"])}
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(tiny_sdxl.scheduler().config)
    theirs = reference(**call, image=image, num_inference_steps=5, generator=torch.Generator().manual_seed(9), **theirs_options).images
    ours = pipe(**call, scheduler="euler", num_inference_steps=5, seed=9, control=ControlUnit(root / "cn", image, **ours_options))
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    plain = pipe(**call, scheduler="euler", num_inference_steps=5, seed=9)
    assert np.abs(plain.images - theirs).max() > 1e-2  # the ControlNet steered the image


def test_an_sd_controlnet_on_sdxl_is_one_line_naming_both(models, tmp_path):
    from tiny_models import diffusers_unet

    _, pipe, _ = models
    random_controlnet(diffusers_unet("sd1"), seed=1).save_pretrained(tmp_path / "sd-cn")
    with pytest.raises(ConfigError, match=r"ControlNet sd-cn was made for a U-Net with .*but this model's U-Net has") as raised:
        pipe(**COMMON, num_inference_steps=2, seed=1, control=ControlUnit(tmp_path / "sd-cn", control_image(0)))
    assert "\n" not in str(raised.value)


def test_sdxl_controlnet_single_files_make_the_folders_image(models, tmp_path):
    """A diffusers-layout state dict saved as one file (a renamed diffusion_pytorch_model.safetensors) and the
    original layout (SDXL's added conditioning as label_emb.0.N) carry no config: their shapes give SDXL's
    transformer depths and added conditioning, and they steer as the folder does."""
    from safetensors.torch import load_file, save_file
    from test_controlnet import original_layout

    _, pipe, root = models
    state = load_file(root / "cn" / "diffusion_pytorch_model.safetensors")
    save_file(state, tmp_path / "diffusers-layout.safetensors")
    added = {key: value for key, value in state.items() if key.startswith("add_embedding.")}
    original = original_layout({key: value for key, value in state.items() if key not in added})
    original.update({f"control_model.label_emb.0.{2 * int(key[len('add_embedding.linear_')]) - 2}.{key.rsplit('.', 1)[1]}": value
                     for key, value in added.items()})  # fmt: skip
    save_file(original, tmp_path / "original.safetensors")
    image = control_image(3)
    call = dict(**COMMON, scheduler="euler", num_inference_steps=3, seed=2)
    expected = pipe(**call, control=ControlUnit(root / "cn", image)).images
    for name in ("diffusers-layout", "original"):
        got = pipe(**call, control=ControlUnit(tmp_path / f"{name}.safetensors", image)).images
        # The same weights; the CPU kernels may sum in another order for tensors at other addresses.
        assert np.abs(got - expected).max() < 1e-5, name


def test_the_extension_api_steers_an_sdxl_model_as_python_does(models, tmp_path):
    """sd-webui-controlnet's ``alwayson_scripts`` on a server of an SDXL model, with an SDXL ControlNet file from
    its controlnet folder: the image is the Python call's."""
    from safetensors.torch import load_file, save_file
    from serving import decode_png, png_base64, post_once

    from ldm.server.config import ServerConfig

    _, pipe, root = models
    folder = tmp_path / "controlnets"
    folder.mkdir()
    save_file(load_file(root / "cn" / "diffusion_pytorch_model.safetensors"), folder / "xl-canny.safetensors")
    unit = {"module": "canny", "model": "xl-canny", "image": png_base64(control_image(8)), "weight": 0.8}
    request = {"prompt": COMMON["prompt"], "negative_prompt": "blurry", "steps": 3, "cfg_scale": 7.5, "width": 64, "height": 64,
               "seed": 6, "sampler_name": "Euler", "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
    config = ServerConfig(model=root / "model", controlnet_dir=folder, device="cpu")
    answer = post_once(config, "/sdapi/v1/txt2img", request)
    assert answer.status_code == 200, answer.text
    served = decode_png(answer.json()["images"][0])
    unit_call = ControlUnit(folder / "xl-canny.safetensors", control_image(8), preprocess="canny", scale=0.8)
    expected = pipe(**{**COMMON, "output_type": "pil"}, scheduler="euler", num_inference_steps=3, seed=6, control=unit_call).images[0]
    # The server's pipeline holds its own copies of the weights, at other addresses: the CPU kernels may sum in
    # another order (one level at most).
    difference = np.abs(np.asarray(served, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert 'ControlNet 0: "Module: canny, Model: xl-canny [' in served.info["parameters"]


def test_the_hires_pass_is_steered_at_its_size_as_diffusers_sdxl_controlnet_img2img(models):
    """On SDXL too: diffusers' SDXL ControlNet txt2img to latents, the latent upscale, then its SDXL ControlNet
    img2img at the larger size (whose micro-conditioning and control map are that size's; 4 hires steps at
    strength 0.5: the last 4 of 8)."""
    import torch.nn.functional as F

    reference, pipe, root = models
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(tiny_sdxl.scheduler().config)
    image, generator = control_image(0), lambda: torch.Generator().manual_seed(3)
    latents = reference(**{**COMMON, "output_type": "latent"}, image=image, num_inference_steps=3, generator=generator()).images
    img2img = diffusers.StableDiffusionXLControlNetImg2ImgPipeline(**reference.components)  # default scale 0.8
    img2img.set_progress_bar_config(disable=True)
    assert_the_hires_pass_is(img2img, F.interpolate(latents, size=(16, 16), mode="bilinear"), pipe, root / "cn", image)


def test_ldm_info_describes_controlnets_of_each_family_and_layout(models, tmp_path, capsys):
    """A ControlNet folder, a diffusers-layout file and an original-layout file: the family it steers, read from its
    added conditioning (SDXL) or text width (SD 1.x: 768, SD 2.x: 1024; the tiny one's is 64), the layout, its
    parameters."""
    import json

    from safetensors.torch import load_file, save_file
    from test_controlnet import original_layout
    from tiny_models import diffusers_unet

    from ldm.cli import main

    _, _, root = models
    state = load_file(root / "cn" / "diffusion_pytorch_model.safetensors")
    save_file(state, tmp_path / "xl.safetensors")
    sd = random_controlnet(diffusers_unet("sd1"), seed=1)
    save_file(original_layout(sd.state_dict()), tmp_path / "sd15.safetensors")
    expected = {
        root / "cn": ("SDXL", "diffusers folder"),
        tmp_path / "xl.safetensors": ("SDXL", "diffusers names"),
        tmp_path / "sd15.safetensors": ("SD 1.x/2.x-shaped (text width 64)", "original (cldm, control_model.*)"),
    }
    for path, (family, layout) in expected.items():
        capsys.readouterr()
        assert main(["info", str(path), "--json", "--no-hash"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert (found["what"], found["family"], found["layout"]) == ("ControlNet", family, layout), path
        if path.is_file():
            assert found["parameters"] == sum(value.numel() for value in load_file(path).values())


def test_a_base_part_stopping_at_denoising_end_counts_the_control_window_over_the_whole_schedule(models):
    """As diffusers' SDXL ControlNet pipeline with ``denoising_end`` (the base of an ensemble of experts): the unit's
    start/end fractions are of all the scheduled steps, not of those run before the cut."""
    from ldm.sdxl import SdxlOptions

    reference, pipe, root = models
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(tiny_sdxl.scheduler().config)
    image = control_image(5)
    call = {**COMMON, "output_type": "latent"}
    theirs = reference(
        **call, image=image, num_inference_steps=8, denoising_end=0.75, control_guidance_end=0.5,
        generator=torch.Generator().manual_seed(4),
    ).images  # fmt: skip
    ours = pipe(
        **call, scheduler="euler", num_inference_steps=8, seed=4, sdxl=SdxlOptions(denoising_end=0.75),
        control=ControlUnit(root / "cn", image, end=0.5),
    ).images  # fmt: skip
    assert (ours - theirs).abs().max() < TOLERANCE
    over_the_run = pipe(
        **call, scheduler="euler", num_inference_steps=8, seed=4, sdxl=SdxlOptions(denoising_end=0.75),
        control=ControlUnit(root / "cn", image, end=0.5 * 0.75),
    ).images  # fmt: skip
    assert (over_the_run - theirs).abs().max() > 1e-4  # the window is of the 8 steps, not of the 6 run
