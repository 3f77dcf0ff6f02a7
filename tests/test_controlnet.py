"""ControlNet: ldm's network, loaders, call options, command line and server against diffusers.

A random-weight SD 1.x-shaped model (tests/tiny_models.py) and ControlNets built from its U-Net with
diffusers' ``ControlNetModel.from_unet`` (every weight then moved off its zero init, so the residuals
matter) give the images diffusers' ``StableDiffusionControlNetPipeline`` gives, within 1e-4 in [0, 1]
pixels: one ControlNet and a ``MultiControlNetModel`` of two, two samplers, guess mode and a start/end window.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import diffusers_pipeline, diffusers_unet

from ldm.control import ControlUnit, canny, control_map, resized
from ldm.errors import CheckpointError, ConfigError, InputError, SettingError
from ldm.pipeline import Pipeline

TOLERANCE = 1e-4
HINT_WIDTHS = (8, 16, 16, 32)  # the hint encoder: 3 halvings, 64 px images to the 8 x 8 latents
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=7.5, height=64, width=64, output_type="np")


def random_controlnet(unet, seed: int):
    """A diffusers ControlNet copied from ``unet`` with every weight (zero convolutions too) moved at random."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_WIDTHS).eval()
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return controlnet


def control_image(seed: int, size=(80, 48)) -> Image.Image:
    """A random RGB image of another size than the output, so both pipelines resize it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# The original single-file layout (lllyasviel's cldm.ControlNet), written here from the facts: the
# encoder named as CompVis' U-Net, input_hint_block.N (every other module a SiLU), zero_convs.i.0, middle_block_out.0.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_ORIGINAL = [
    (r"time_embedding\.linear_1\.(.+)", lambda m: f"time_embed.0.{m[1]}"),
    (r"time_embedding\.linear_2\.(.+)", lambda m: f"time_embed.2.{m[1]}"),
    (r"conv_in\.(.+)", lambda m: f"input_blocks.0.0.{m[1]}"),
    (r"down_blocks\.(\d)\.resnets\.(\d)\.(\w+)\.(.+)", lambda m: f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.0.{_RESNET[m[3]]}.{m[4]}"),
    (r"down_blocks\.(\d)\.attentions\.(\d)\.(.+)", lambda m: f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.1.{m[3]}"),
    (r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", lambda m: f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"),
    (r"mid_block\.resnets\.(\d)\.(\w+)\.(.+)", lambda m: f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.{m[3]}"),
    (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
    (r"controlnet_cond_embedding\.conv_in\.(.+)", lambda m: f"input_hint_block.0.{m[1]}"),
    (r"controlnet_cond_embedding\.blocks\.(\d)\.(.+)", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"),
    (r"controlnet_cond_embedding\.conv_out\.(.+)", lambda m: f"input_hint_block.14.{m[1]}"),
    (r"controlnet_down_blocks\.(\d+)\.(.+)", lambda m: f"zero_convs.{m[1]}.0.{m[2]}"),
    (r"controlnet_mid_block\.(.+)", lambda m: f"middle_block_out.0.{m[1]}"),
]


def original_layout(state: dict[str, torch.Tensor], prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    def renamed(key: str) -> str:
        for pattern, rename in _ORIGINAL:
            if m := re.fullmatch(pattern, key):
                return rename(m)
        raise KeyError(key)

    return {prefix + renamed(key): value.contiguous() for key, value in state.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers pipeline parts, ldm pipeline, paths): the tiny model, two ControlNets as folders and one as a file."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("controlnet")
    diffusers_pipeline("sd1").save_pretrained(root / "model")
    # Read back, so its scheduler config is the folder's, which ldm reads too (each sampler swaps in from it).
    reference = StableDiffusionPipeline.from_pretrained(root / "model", safety_checker=None, requires_safety_checker=False)
    nets = [random_controlnet(reference.unet, seed) for seed in (1, 2)]
    for i, net in enumerate(nets):
        net.save_pretrained(root / f"cn{i}")
    save_file(original_layout(nets[0].state_dict()), root / "cn0.safetensors")
    pipe = Pipeline.from_pretrained(root / "model")
    return reference, nets, pipe, root


def diffusers_controlnet_pipeline(reference, controlnet, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionControlNetPipeline(
        reference.vae, reference.text_encoder, reference.tokenizer, reference.unet, controlnet, reference.scheduler,
        None, None, requires_safety_checker=False,
    )  # fmt: skip
    name = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}[scheduler]
    pipe.scheduler = getattr(diffusers, name).from_config(reference.scheduler.config)
    return pipe


# --- parity with diffusers --------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_one_controlnet_matches_diffusers_and_changes_the_image(models, scheduler):
    reference, nets, pipe, root = models
    image = control_image(0)
    theirs = diffusers_controlnet_pipeline(reference, nets[0], scheduler)(
        **COMMON, image=image, num_inference_steps=5, generator=torch.Generator().manual_seed(3)
    ).images
    ours = pipe(**COMMON, scheduler=scheduler, num_inference_steps=5, seed=3, control=ControlUnit(root / "cn0", image))
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    plain = pipe(**COMMON, scheduler=scheduler, num_inference_steps=5, seed=3)
    assert np.abs(plain.images - theirs).max() > 1e-2  # the ControlNet steered the image


def test_two_controlnets_match_diffusers_multicontrolnet(models):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    reference, nets, pipe, root = models
    images = [control_image(0), control_image(1, (64, 64))]
    theirs = diffusers_controlnet_pipeline(reference, MultiControlNetModel(nets), "ddim")(
        **COMMON, image=images, controlnet_conditioning_scale=[0.6, 1.4], num_inference_steps=4,
        generator=torch.Generator().manual_seed(5),
    ).images  # fmt: skip
    units = [ControlUnit(root / "cn0", images[0], scale=0.6), ControlUnit(root / "cn1", images[1], scale=1.4)]
    ours = pipe(**COMMON, scheduler="ddim", num_inference_steps=4, seed=5, control=units)
    assert np.abs(ours.images - theirs).max() < TOLERANCE


@pytest.mark.parametrize(
    ("theirs_options", "ours_options"),
    [
        ({"guess_mode": True, "guidance_scale": 4.0}, {"mode": "controlnet"}),
        ({"control_guidance_start": 0.3, "control_guidance_end": 0.7}, {"start": 0.3, "end": 0.7}),
    ],
    ids=["guess-mode", "start-end-window"],
)
def test_guess_mode_and_a_window_match_diffusers(models, theirs_options, ours_options):
    reference, nets, pipe, root = models
    image = control_image(2)
    call = {**COMMON, "guidance_scale": theirs_options.pop("guidance_scale", COMMON["guidance_scale"])}
    theirs = diffusers_controlnet_pipeline(reference, nets[0], "euler")(
        **call, image=image, num_inference_steps=5, generator=torch.Generator().manual_seed(9), **theirs_options
    ).images
    ours = pipe(**call, scheduler="euler", num_inference_steps=5, seed=9, control=ControlUnit(root / "cn0", image, **ours_options))
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    balanced = pipe(**call, scheduler="euler", num_inference_steps=5, seed=9, control=ControlUnit(root / "cn0", image))
    assert np.abs(balanced.images - theirs).max() > 1e-3  # the option mattered


def test_prompt_mode_scales_residuals_as_guess_mode_on_every_row(models):
    """"My prompt is more important": diffusers' guess-mode scales (10^((k - 12) / 12) for SD), on both batches."""
    from ldm.pipeline.control import PreparedUnit, unit_residuals

    reference, nets, pipe, root = models
    network = pipe.controlnets.find(pipe, root / "cn0").network
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    text = torch.randn(2, 77, 64)
    image = torch.rand(1, 3, 64, 64)
    prepared = PreparedUnit(ControlUnit(root / "cn0", control_image(0), scale=0.7, mode="prompt"), network, image, "cn0")
    with torch.no_grad():
        ours = unit_residuals(prepared, network.embed_hint(image), x, t, text, uncond=1)
        down, mid = nets[0](x.repeat(2, 1, 1, 1), t, text, image, conditioning_scale=0.7, guess_mode=True, return_dict=False)
    assert len(ours.down) == len(down) == 9  # the tiny U-Net's skips; SD's 12 and the middle make 13
    for a, b in zip((*ours.down, ours.mid), (*down, mid)):
        assert torch.allclose(a.expand_as(b), b, atol=1e-5)


# --- loading ----------------------------------------------------------------------------------------


def test_an_original_single_file_loads_the_folders_weights_as_diffusers_own_loader_does(models, tmp_path):
    from diffusers import ControlNetModel

    from ldm.loading.controlnet import load_controlnet

    reference, nets, pipe, root = models
    base = pipe.unet.config
    folder = load_controlnet(root / "cn0", base=base)
    single = load_controlnet(root / "cn0.safetensors", base=base)
    assert single.config == folder.config
    theirs = ControlNetModel.from_single_file(str(root / "cn0.safetensors"), config=str(root / "cn0"), local_files_only=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(single.state_dict()[key], value) and torch.equal(folder.state_dict()[key], value)
    # A .pth of plain tensors without the control_model. prefix (read with weights_only) holds the same network.
    torch.save(original_layout(nets[0].state_dict(), prefix=""), tmp_path / "cn.pth")
    pth = load_controlnet(tmp_path / "cn.pth", base=base)
    assert all(torch.equal(pth.state_dict()[key], value) for key, value in folder.state_dict().items())


def test_a_single_file_makes_the_same_image_as_its_folder_and_names_itself_in_the_infotext(models):
    reference, nets, pipe, root = models
    image = control_image(3)
    from_folder = pipe(**COMMON, num_inference_steps=3, seed=1, control=ControlUnit(root / "cn0", image))
    from_file = pipe(**COMMON, num_inference_steps=3, seed=1, control=ControlUnit(str(root / "cn0.safetensors"), image))
    # The same weights (above); the CPU kernels may sum in another order for tensors at other addresses.
    assert np.abs(from_file.images - from_folder.images).max() < 1e-5
    text = from_file.parameters[0].extra["ControlNet 0"]
    assert re.fullmatch(r"Module: none, Model: cn0 \[[0-9a-f]{8}\], Weight: 1, Resize Mode: Just Resize, .*Control Mode: Balanced", text)


def test_load_controlnet_names_a_network_that_units_then_use(models):
    reference, nets, pipe, root = models
    name = pipe.load_controlnet(root / "cn1", name="depth")
    image = control_image(4)
    by_name = pipe(**COMMON, num_inference_steps=3, seed=2, control=ControlUnit(name, image))
    by_path = pipe(**COMMON, num_inference_steps=3, seed=2, control=ControlUnit(root / "cn1", image))
    assert np.abs(by_name.images - by_path.images).max() < 1e-5
    pipe.unload_controlnet(name)
    with pytest.raises(SettingError, match="neither a ControlNet file"):
        pipe(**COMMON, num_inference_steps=3, seed=2, control=ControlUnit(name, image))


# --- control maps -----------------------------------------------------------------------------------


def test_canny_is_cv2_canny_of_the_resized_image_in_three_channels():
    import cv2

    image = control_image(5, (64, 64))
    edges = cv2.Canny(np.asarray(image), 100, 200)
    assert edges.any() and not edges.all()
    assert np.array_equal(np.asarray(canny(image, 100, 200)), np.repeat(edges[:, :, None], 3, axis=2))
    unit = ControlUnit("cn", control_image(5), preprocess="canny", thresholds=(50, 150))
    expected = cv2.Canny(np.asarray(control_image(5).resize((64, 32), Image.Resampling.LANCZOS)), 50, 150)
    assert np.array_equal(np.asarray(control_map(unit, 64, 32))[:, :, 0], expected)


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_resize_modes_are_diffusers_image_processors(mode):
    from diffusers.image_processor import VaeImageProcessor

    image = control_image(6, (90, 40))
    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    theirs = processor.preprocess(image, height=48, width=64, resize_mode="default" if mode == "resize" else mode)
    ours = np.asarray(resized(image, 64, 48, mode), dtype=np.float32) / 255.0
    assert np.abs(ours - theirs[0].permute(1, 2, 0).numpy()).max() < 1e-6


# --- bad input --------------------------------------------------------------------------------------


def test_a_controlnet_of_another_base_is_one_line_naming_both(models, tmp_path):
    reference, nets, pipe, root = models
    random_controlnet(diffusers_unet("sd2"), 0).save_pretrained(tmp_path / "sd2-cn")
    with pytest.raises(ConfigError) as error:
        pipe(**COMMON, num_inference_steps=2, seed=0, control=ControlUnit(tmp_path / "sd2-cn", control_image(0)))
    message = str(error.value)
    assert "\n" not in message and "cross-attention width 128" in message and "cross-attention width 64" in message


def test_bad_images_files_and_values_are_one_line_errors(models, tmp_path):
    reference, nets, pipe, root = models
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SettingError, match=r"control\.image: .*broken\.png"):
        ControlUnit(root / "cn0", tmp_path / "broken.png")
    with pytest.raises(SettingError, match=r"control\.image: .*missing\.png does not exist"):
        ControlUnit(root / "cn0", tmp_path / "missing.png")
    with pytest.raises(SettingError, match="neither a ControlNet file or folder"):
        pipe(**COMMON, num_inference_steps=2, seed=0, control=ControlUnit(tmp_path / "missing.safetensors", control_image(0)))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        pipe(**COMMON, num_inference_steps=2, seed=0, control=ControlUnit(tmp_path / "junk.safetensors", control_image(0)))
    save_file({"conv.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="is not a ControlNet"):
        pipe(**COMMON, num_inference_steps=2, seed=0, control=ControlUnit(tmp_path / "other.safetensors", control_image(0)))
    for options, field in [({"scale": 3}, "control.scale"), ({"start": 0.8, "end": 0.5}, "control.start"),
                           ({"mode": "guess"}, "control.mode"), ({"thresholds": (10, 20)}, "control.thresholds")]:  # fmt: skip
        with pytest.raises(SettingError, match=re.escape(field)):
            ControlUnit(root / "cn0", control_image(0), **options)
    with pytest.raises(SettingError, match="deepcache_interval"):
        pipe(**COMMON, deepcache_interval=2, control=ControlUnit(root / "cn0", control_image(0)))


# --- command line -----------------------------------------------------------------------------------


def test_each_controlnet_flag_starts_a_unit_that_the_flags_after_it_set(tmp_path):
    from ldm.cli import build_parser
    from ldm.cli.control_args import control_units

    image = tmp_path / "edges.png"
    control_image(0).save(image)
    for name in ("a.safetensors", "b.pth"):
        (tmp_path / name).write_bytes(b"")
    parser = build_parser()

    def units(*flags):
        return control_units(parser.parse_args(["txt2img", "x", *map(str, flags)]))

    first, second = units(
        "--controlnet", tmp_path / "a.safetensors", "--control-image", image, "--control-scale", "0.5", "--control-guess-mode",
        "--controlnet", tmp_path / "b.pth", "--control-image", image, "--control-preprocess", "canny",
        "--control-thresholds", "50,150", "--control-start", "0.1", "--control-end", "0.9", "--control-resize", "crop",
    )  # fmt: skip
    assert (first.model.name, first.scale, first.mode, first.preprocess) == ("a.safetensors", 0.5, "controlnet", "none")
    assert (second.model.name, second.preprocess, second.thresholds, second.start, second.end, second.resize_mode) == (
        "b.pth", "canny", (50, 150), 0.1, 0.9, "crop",
    )  # fmt: skip
    with pytest.raises(InputError, match="comes before any --controlnet"):
        units("--control-image", image)
    with pytest.raises(InputError, match="unit 1 .*has no --control-image"):
        units("--controlnet", tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="twice"):
        units("--controlnet", tmp_path / "a.safetensors", "--control-image", image, "--control-mode", "prompt", "--control-guess-mode")
    with pytest.raises(SettingError) as error:
        units("--controlnet", tmp_path / "a.safetensors", "--control-image", image, "--control-end", "2")
    assert error.value.worded(parser.parse_args(["txt2img", "x"]).flag).startswith("ControlNet unit 1: --control-end must be in")


def test_txt2img_writes_the_controlled_image(models, tmp_path):
    from ldm.cli import main

    reference, nets, pipe, root = models
    image = tmp_path / "map.png"
    control_image(7).save(image)
    code = main(["txt2img", "a photo of a red cat", "--negative-prompt", "blurry", "--model", str(root / "model"), "--steps", "3",
                 "--seed", "4", "--scheduler", "ddim", "--width", "64", "--height", "64", "--out", str(tmp_path / "out"), "--quiet",
                 "--controlnet", str(root / "cn0.safetensors"), "--control-image", str(image), "--control-scale", "0.8"])  # fmt: skip
    assert code == 0
    written = next((tmp_path / "out").glob("*.png"))
    expected = pipe(**{**COMMON, "output_type": "pil"}, scheduler="ddim", num_inference_steps=3, seed=4,
                    control=ControlUnit(root / "cn0.safetensors", image, scale=0.8)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(expected))
    assert "ControlNet 0: \"Module: none, Model: cn0 [" in Image.open(written).info["parameters"]


# --- server -----------------------------------------------------------------------------------------


def test_the_extension_api_makes_the_python_image_and_names_bad_fields(models, tmp_path):
    from serving import LiveServer

    from ldm.server.config import ServerConfig

    reference, nets, pipe, root = models
    folder = tmp_path / "controlnets"
    folder.mkdir()
    (folder / "canny.safetensors").write_bytes((root / "cn0.safetensors").read_bytes())
    buffer = io.BytesIO()
    control_image(8).save(buffer, format="PNG")
    unit = {"module": "canny", "model": "canny", "image": base64.b64encode(buffer.getvalue()).decode(), "weight": 0.9,
            "guidance_end": 0.8, "control_mode": "ControlNet is more important", "resize_mode": 0, "processor_res": 512}  # fmt: skip
    request = {"prompt": COMMON["prompt"], "negative_prompt": "blurry", "steps": 3, "cfg_scale": 7.5, "width": 64, "height": 64,
               "seed": 6, "sampler_name": "DDIM", "alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False}]}}}  # fmt: skip
    server = LiveServer(ServerConfig(model=root / "model", controlnet_dir=folder, device="cpu"))
    try:
        with server.client() as http:
            models_listed = http.get("/controlnet/model_list").json()["model_list"]
            assert len(models_listed) == 1 and re.fullmatch(r"canny \[[0-9a-f]{8}\]", models_listed[0])
            assert http.get("/controlnet/module_list").json() == {"module_list": ["none", "canny"]}
            answer = http.post("/sdapi/v1/txt2img", json=request)
            assert answer.status_code == 200, answer.text
            for change, field in [({"module": "depth"}, "args[0].module"), ({"model": "nope"}, "args[0].model"),
                                  ({"weight": 5}, "args[0].weight"), ({"image": "@@"}, "args[0].image")]:  # fmt: skip
                bad = {**request, "alwayson_scripts": {"controlnet": {"args": [{**unit, **change}]}}}
                refused = http.post("/sdapi/v1/txt2img", json=bad)
                assert refused.status_code == 422 and field in refused.text, refused.text
    finally:
        server.stop()
    served = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    expected = pipe(**{**COMMON, "output_type": "pil"}, scheduler="ddim", num_inference_steps=3, seed=6, control=ControlUnit(
        folder / "canny.safetensors", control_image(8), preprocess="canny", scale=0.9, end=0.8, mode="controlnet")).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(served), np.asarray(expected))
    assert 'ControlNet 0: "Module: canny, Model: canny [' in served.info["parameters"]


def test_the_hires_pass_is_steered_at_its_own_size_as_diffusers_controlnet_img2img(models):
    """A ControlNet acts in the hires pass too (as the sd-webui-controlnet extension applies it), on its control
    map made at the larger size: diffusers' ControlNet txt2img, the latent upscale, then its ControlNet img2img
    (4 hires steps at strength 0.5: the last 4 of 8, A1111's rule)."""
    import diffusers
    import torch.nn.functional as F

    reference, nets, pipe, root = models
    image, generator = control_image(0), lambda: torch.Generator().manual_seed(3)
    first = diffusers_controlnet_pipeline(reference, nets[0], "euler")
    latents = first(**{**COMMON, "output_type": "latent"}, image=image, num_inference_steps=3, generator=generator()).images
    second = diffusers.StableDiffusionControlNetImg2ImgPipeline(**first.components)
    assert_the_hires_pass_is(second, F.interpolate(latents, size=(16, 16), mode="bilinear"), pipe, root / "cn0", image)


def assert_the_hires_pass_is(img2img, latents, pipe, controlnet, image) -> None:
    """ldm's Euler image with ``controlnet`` steering both passes (3 steps, then 4 hires steps at strength 0.5, x2)
    against ``img2img`` (diffusers' ControlNet img2img) of the upscaled first-pass ``latents`` at the larger size
    over 8 steps, seeded again with seed 3 (A1111's rule; the unit's scale 1 given, where a pipeline's default differs)."""
    theirs = img2img(
        **{**COMMON, "height": 128, "width": 128}, image=latents, control_image=image, controlnet_conditioning_scale=1.0,
        strength=0.5, num_inference_steps=8, generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    ours = pipe(
        **COMMON, scheduler="euler", num_inference_steps=3, seed=3, control=ControlUnit(controlnet, image),
        hires_scale=2, hires_steps=4, hires_strength=0.5,
    ).images  # fmt: skip
    assert ours.shape == theirs.shape == (1, 128, 128, 3)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_a_one_shot_hires_call_keeps_its_controlnet_for_the_second_pass(models):
    """weights_after_use="release" frees each network after its last use: with a hires pass that is after the
    second pass, for the ControlNets as for the U-Net."""
    _, _, _, root = models
    pipe = Pipeline.from_pretrained(root / "model")
    name = pipe.load_controlnet(root / "cn0")
    call = dict(**COMMON, num_inference_steps=2, seed=1, control=ControlUnit(name, control_image(0)), hires_scale=2, hires_strength=0.5)
    kept = pipe(**call).images
    pipe.configure(weights_after_use="release")
    assert np.array_equal(pipe(**call).images, kept)
