"""Inpainting and outpainting (ldm.masks, ldm.inpainting, ldm.pipeline.inpaint).

Parity: random-weight SD-shaped models, one with an inpainting U-Net (9 input channels) and one
ordinary (4, blended), give the images diffusers' StableDiffusionInpaintPipeline gives for the same
image, mask, prompt, seed, steps and sampler (max abs difference < 1e-4 in [0, 1] pixels, fp32),
once ldm's paste of the original outside the mask is applied to diffusers' output (diffusers pastes
only with ``padding_mask_crop``). Then A1111's options, outpainting, and bad input.
"""

from __future__ import annotations

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import diffusers_pipeline, diffusers_unet

from ldm.cli import main
from ldm.errors import SettingError
from ldm.images import read_parameters
from ldm.inpainting import Inpaint
from ldm.loading import load_components, save_single_file
from ldm.pipeline import Pipeline
from ldm.settings import GenerationSettings

TOLERANCE = 1e-4
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=7.5)
BOX = (20, 16, 50, 40)  # x1, y1, x2, y2 of the test mask's white box, in a 64 x 64 image


def init_image(width: int = 64, height: int = 64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    array = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255)
    return Image.fromarray(array.astype(np.uint8))


def box_mask(box=BOX, size=(64, 64), value: int = 255) -> Image.Image:
    mask = np.zeros(size[::-1], dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = value
    return Image.fromarray(mask)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


# runwayml/stable-diffusion-v1-5's scheduler config, verbatim: it leaves out timestep_spacing, which each sampler
# then fills with its own diffusers default (as tests/test_pipeline_parity.py explains).
RELEASED_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}  # fmt: skip


def _models(tmp_path_factory, in_channels: int):
    reference = diffusers_pipeline("sd1")
    reference.unet = diffusers_unet("sd1", in_channels=in_channels)
    folder = tmp_path_factory.mktemp(f"unet{in_channels}") / "model"
    reference.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(RELEASED_SCHEDULER_CONFIG))
    return inpainting_pair(diffusers.StableDiffusionInpaintPipeline(**reference.components), folder)


def inpainting_pair(reference, folder):
    """(diffusers' inpainting pipeline, ldm's pipeline of the folder it was saved to, the folder)."""
    reference.set_progress_bar_config(disable=True)
    return reference, Pipeline.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    """diffusers' inpainting pipeline and ldm's, on one random-weight model whose U-Net takes 9 channels."""
    return _models(tmp_path_factory, 9)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """The same for an ordinary (4-channel) U-Net, which inpaints by blending."""
    return _models(tmp_path_factory, 4)


def swap(reference, sampler: str) -> None:
    name = {"ddim": "DDIMScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler", "dpm-solver++": "DPMSolverMultistepScheduler"}
    reference.scheduler = getattr(diffusers, name[sampler]).from_config(RELEASED_SCHEDULER_CONFIG)


# --- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["inpainting_model", "plain_model"])
@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("euler-ancestral", 0.75)])
def test_a_batch_matches_diffusers_inpainting_image_by_image(request, model, sampler, strength):
    """Image i of a batch with seed s is diffusers' image for seed s + i (the seed rule), which shows the draws
    (posterior, noise, masked image's posterior) come from each image's generator in diffusers' order; the
    stochastic sampler shows the generators go on where diffusers' do."""
    reference, pipe, _ = request.getfixturevalue(model)
    swap(reference, sampler)
    assert_a_batch_is_the_reference_image_by_image(reference, pipe, sampler, strength)


def assert_a_batch_is_the_reference_image_by_image(reference, pipe, sampler: str, strength: float) -> None:
    """A batch of 2 from seed 30 against ``reference`` (a diffusers inpainting pipeline on ``sampler``'s scheduler)
    called with seeds 30 and 31, inside the mask; outside it, the init image's pixels."""
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
    assert np.abs(ours.images[0] - ours.images[1]).max() > 1e-3


def test_only_masked_matches_diffusers_padding_mask_crop(plain_model):
    """"Inpaint area: only masked" is diffusers' padding_mask_crop: the same box, generated at width x height
    (the same latents), scaled back and pasted over the original (the same pixels, to 8-bit rounding)."""
    reference, pipe, _ = plain_model
    swap(reference, "dpm-solver++")
    assert_only_masked_is_padding_mask_crop(reference, pipe, "dpm-solver++")


def assert_only_masked_is_padding_mask_crop(reference, pipe, sampler: str) -> None:
    """ldm's "only masked" (padding 6) against ``reference``'s padding_mask_crop=6 (its scheduler ``sampler``'s)."""
    image, mask = init_image(96, 80), box_mask((30, 20, 50, 36), (96, 80))
    theirs_last = {}

    def grab(_, i, t, tensors):
        theirs_last["latents"] = tensors["latents"]
        return tensors

    theirs = reference(
        **COMMON, image=image, mask_image=mask, width=64, height=64, padding_mask_crop=6, strength=0.9,
        num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(3), callback_on_step_end=grab,
    ).images[0]  # fmt: skip
    ours_last = {}
    options = Inpaint(mask=mask, mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=6)
    ours = pipe(
        **COMMON, init_image=image, mask=options, width=64, height=64, strength=0.9, num_inference_steps=4, seed=3,
        scheduler=sampler, callback=lambda i, t, x, x0: ours_last.update(latents=x),
    ).images[0]  # fmt: skip
    assert (ours_last["latents"] - theirs_last["latents"]).abs().max() < TOLERANCE
    assert ours.size == theirs.size == (96, 80)
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(ours)[outside], np.asarray(image)[outside])


def test_txt2img_on_an_inpainting_model_is_inpainting_with_an_all_white_mask(inpainting_model):
    """As A1111 runs it: the whole image masked, the masked image grey (encoded like any masked image)."""
    _, pipe, _ = inpainting_model
    plain = pipe(**COMMON, num_inference_steps=3, scheduler="euler-ancestral", seed=4, output_type="np").images
    white = Image.new("L", (64, 64), 255)
    masked = pipe(
        **COMMON, init_image=init_image(), mask=Inpaint(mask=white, mask_blur=0), strength=1.0, num_inference_steps=3,
        scheduler="euler-ancestral", seed=4, output_type="np",
    ).images  # fmt: skip
    assert np.abs(plain - masked).max() < 1e-6
    assert np.abs(plain - pixels(init_image())).max() > 0.05


def test_a_hires_pass_on_an_inpainting_model_is_refused_before_any_work(inpainting_model):
    _, pipe, _ = inpainting_model
    with pytest.raises(SettingError, match="hires_scale runs a second pass that an inpainting model") as raised:
        pipe(**COMMON, num_inference_steps=1, seed=4, hires_scale=2, callback=lambda *step: pytest.fail("it ran"))
    assert "\n" not in str(raised.value)


# --- what is kept ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("inpainting_model", {"mask_blur": 0}),
        ("plain_model", {"mask_blur": 4, "inpainting_fill": "fill"}),
        ("plain_model", {"inpaint_full_res": True, "inpaint_full_res_padding": 4, "inpainting_fill": "latent-noise"}),
        ("inpainting_model", {"mask_blur": 2, "inpainting_mask_invert": True, "inpainting_fill": "latent-nothing"}),
    ],
)
def test_pixels_the_mask_does_not_reach_are_the_init_images(request, model, options):
    """Every mode pastes the result over the original with the blurred mask as opacity (A1111's overlay): a pixel
    farther from the repainted area than the blur reaches is the init image's, to the bit."""
    _, pipe, _ = request.getfixturevalue(model)
    image = init_image()
    out = pipe(**COMMON, init_image=image, mask=Inpaint(mask=box_mask(), **options), strength=0.8, num_inference_steps=3, seed=9)
    reach = int(2.5 * options.get("mask_blur", 4) + 0.5)  # the blur kernel's half-width
    x1, y1, x2, y2 = BOX
    near = np.zeros((64, 64), dtype=bool)
    near[max(y1 - reach, 0) : y2 + reach, max(x1 - reach, 0) : x2 + reach] = True
    inner = np.zeros((64, 64), dtype=bool)
    inner[y1 + reach : y2 - reach, x1 + reach : x2 - reach] = True
    kept, repainted = (inner, ~near) if options.get("inpainting_mask_invert") else (~near, inner)
    ours, original = np.asarray(out.images[0], dtype=np.int16), np.asarray(image, dtype=np.int16)
    assert np.array_equal(ours[kept], original[kept])
    assert np.abs(ours[repainted] - original[repainted]).mean() > 5


def test_the_four_fills_start_differently_and_are_written(plain_model):
    _, pipe, _ = plain_model
    results = {}
    for fill in ("fill", "original", "latent-noise", "latent-nothing"):
        out = pipe(
            **COMMON, init_image=init_image(), mask=Inpaint(mask=box_mask(), inpainting_fill=fill), strength=0.5,
            num_inference_steps=4, seed=2, output_type="np",
        )  # fmt: skip
        results[fill] = out.images
        written = out.settings.parameters()[0].extra.get("Masked content")
        assert written == {"fill": "fill", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}.get(fill)
    names = list(results)
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(results[names[a]] - results[names[b]]).max() > 1e-3, (names[a], names[b])


def test_fill_paints_the_masked_area_with_the_colours_around_it():
    from ldm.masks import fill

    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32] = (200, 0, 0)
    image[:, 32:] = (0, 0, 200)
    image[20:44, 20:44] = (0, 255, 0)  # hidden by the mask
    filled = np.asarray(fill(Image.fromarray(image), box_mask((20, 20, 44, 44))), dtype=np.int16)
    outside = np.asarray(box_mask((20, 20, 44, 44))) == 0
    assert np.array_equal(filled[outside], image[outside])
    assert filled[32, 21, 0] > 120 and filled[32, 21, 2] < 80  # the red side's colour reaches in from the left
    assert filled[32, 42, 2] > 120 and filled[32, 42, 0] < 80
    assert filled[20:44, 20:44, 1].max() < 30  # nothing of the hidden green


# --- A1111's metadata, outpainting -------------------------------------------------------------------


def test_the_options_are_written_as_a1111_writes_them(plain_model):
    _, pipe, _ = plain_model
    options = Inpaint(mask=box_mask(), mask_blur=6, inpainting_fill="latent-nothing", inpaint_full_res=True,
                      inpaint_full_res_padding=12, inpainting_mask_invert=True)  # fmt: skip
    out = pipe(**COMMON, init_image=init_image(), mask=options, strength=0.5, num_inference_steps=2, seed=1)
    extra = out.settings.parameters()[0].extra
    assert {key: extra[key] for key in ("Denoising strength", "Mask blur", "Mask mode", "Inpaint area", "Masked area padding", "Masked content")} == {
        "Denoising strength": "0.5", "Mask blur": "6", "Mask mode": "Inpaint not masked", "Inpaint area": "Only masked",
        "Masked area padding": "12", "Masked content": "latent nothing",
    }  # fmt: skip
    plain = pipe(**COMMON, init_image=init_image(), mask=Inpaint(mask=box_mask(), mask_blur=0), strength=0.5, num_inference_steps=2, seed=1)
    assert not {"Mask blur", "Mask mode", "Inpaint area", "Masked area padding", "Masked content"} & set(plain.settings.parameters()[0].extra)


def test_outpainting_grows_the_image_keeps_it_and_records_the_size(inpainting_model, tmp_path):
    _, pipe, _ = inpainting_model
    image = init_image()
    out = pipe(**COMMON, init_image=image, mask=Inpaint(outpaint=(0, 32, 16, 0)), num_inference_steps=3, seed=5)
    assert out.images[0].size == (96, 80)
    params = out.settings.parameters()[0]
    assert (params.width, params.height) == (96, 80) and params.extra["Outpaint"] == "0,32,16,0"
    path = out.save(tmp_path)[0]
    assert read_parameters(path).extra["Outpaint"] == "0,32,16,0"
    ours = np.asarray(out.images[0], dtype=np.int16)
    reach = 2 * 4 + int(2.5 * 4 + 0.5)  # the overlap into the image, then the blur
    kept = ours[16 + reach :, : 64 - reach]
    assert np.array_equal(kept, np.asarray(image, dtype=np.int16)[reach:, : 64 - reach])
    assert np.abs(ours[:16, :].astype(np.float32) - np.asarray(image)[:1, :].mean()).mean() > 5  # the new border was painted


# --- bad input -------------------------------------------------------------------------------------


def test_a_mask_of_another_size_is_resized_to_the_image_with_a_warning(plain_model):
    _, pipe, _ = plain_model
    small = box_mask((10, 8, 25, 20), (32, 32))
    with pytest.warns(UserWarning, match="the mask is 32x32 but the init image 64x64; resized the mask"):
        out = pipe(**COMMON, init_image=init_image(), mask=Inpaint(mask=small), strength=0.6, num_inference_steps=2, seed=3, output_type="np")
    assert out.settings.parameters()[0].extra["Mask resized from"] == "32x32"
    resized = small.resize((64, 64), resample=Image.Resampling.LANCZOS)
    same = pipe(**COMMON, init_image=init_image(), mask=Inpaint(mask=resized), strength=0.6, num_inference_steps=2, seed=3, output_type="np")
    assert np.array_equal(out.images, same.images)


def test_a_grey_mask_is_thresholded_at_128(plain_model):
    """Not used soft: 127 keeps (the pixels stay the init image's), 128 repaints, as a black-and-white mask would."""
    _, pipe, _ = plain_model
    grey = np.zeros((64, 64), dtype=np.uint8)
    grey[16:40, 8:30], grey[16:40, 34:56] = 127, 128
    call = dict(**COMMON, init_image=init_image(), strength=0.9, num_inference_steps=3, seed=6)
    ours = pipe(**call, mask=Inpaint(mask=Image.fromarray(grey), mask_blur=0)).images[0]
    binary = pipe(**call, mask=Inpaint(mask=box_mask((34, 16, 56, 40)), mask_blur=0)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(binary))
    assert np.array_equal(np.asarray(ours)[16:40, 8:30], np.asarray(init_image())[16:40, 8:30])
    assert np.abs(np.asarray(ours, dtype=np.int16)[16:40, 34:56] - np.asarray(init_image(), dtype=np.int16)[16:40, 34:56]).mean() > 5


def test_the_alpha_of_a_transparent_mask_is_the_mask():
    from ldm.masks import mask_channel

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the opaque part is painted
    rgba[2:5, 2:5, 3] = 255
    assert np.array_equal(np.asarray(mask_channel(Image.fromarray(rgba))), rgba[..., 3])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Inpaint(outpaint=(0, 12, 0, 0)), "{outpaint} pixels must be multiples of 8"),
        (lambda: Inpaint(outpaint=(0, 0, 0, 0)), "at least one above 0"),
        (lambda: Inpaint(mask=box_mask(), outpaint=(8, 0, 0, 0)), "give a {mask} or an {outpaint}, not both"),
        (lambda: Inpaint(mask=Image.new("L", (64, 64), 0)), "{mask} is black everywhere: nothing to repaint"),
        (lambda: Inpaint(mask=Image.new("L", (64, 64), 255), inpainting_mask_invert=True), "black everywhere once {inpainting_mask_invert}"),
        (lambda: Inpaint(mask=box_mask(), inpainting_fill="noise"), "{inpainting_fill} must be one of fill, original"),
        (lambda: Inpaint(mask=box_mask(), mask_blur=-1), "{mask_blur} must be from 0 to 64"),
        (lambda: GenerationSettings("a cat", inpaint=Inpaint(mask=box_mask())), "{mask} needs an {init_image}"),
        (lambda: GenerationSettings("a cat", init_image=init_image(), width=64, inpaint=Inpaint(outpaint=(8, 8, 8, 8))), "{outpaint} sets the size"),
    ],
)
def test_bad_inpainting_settings_are_one_line_errors(make, message):
    with pytest.raises(SettingError) as info:
        make()
    assert message in info.value.template and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--mask", "MASK"], "error: --mask needs an --init-image"),
        (["--init-image", "IMAGE", "--outpaint", "0,12,0,0"], "error: --outpaint pixels must be multiples of 8"),
        (["--init-image", "IMAGE", "--outpaint", "0,8"], "error: --outpaint takes four pixel counts"),
        (["--init-image", "IMAGE", "--mask-blur", "8"], "error: --mask-blur apply to inpainting; add --mask FILE"),
    ],
)
def test_cli_inpainting_mistakes_are_one_line_with_exit_2(plain_model, tmp_path, capsys, arguments, message):
    _, _, folder = plain_model
    init_image().save(tmp_path / "image.png")
    box_mask().save(tmp_path / "mask.png")
    arguments = [{"MASK": str(tmp_path / "mask.png"), "IMAGE": str(tmp_path / "image.png")}.get(a, a) for a in arguments]
    code = main(["txt2img", "a cat", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_inpaints_and_writes_the_options(inpainting_model, tmp_path, capsys):
    _, _, folder = inpainting_model
    init_image().save(tmp_path / "image.png")
    box_mask().save(tmp_path / "mask.png")
    code = main([
        "txt2img", "a cat", "--model", str(folder), "--steps", "2", "--seed", "4", "--out", str(tmp_path / "out"), "--quiet",
        "--init-image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--inpainting-fill", "fill",
        "--inpaint-full-res", "--inpaint-full-res-padding", "8",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (path,) = (tmp_path / "out").glob("*.png")
    extra = read_parameters(path).extra
    assert (extra["Mask blur"], extra["Masked content"], extra["Inpaint area"], extra["Masked area padding"]) == ("4", "fill", "Only masked", "8")
    assert Image.open(path).size == (64, 64)


# --- loading, and the rest of the pipeline -----------------------------------------------------------


def test_an_inpainting_model_loads_from_a_folder_and_an_original_single_file(inpainting_model, tmp_path):
    reference, _, folder = inpainting_model
    from_folder = load_components(folder)
    single = save_single_file(from_folder, tmp_path / "inpainting.safetensors")
    from_file = load_components(single)
    assert from_folder.unet.config.in_channels == from_file.unet.config.in_channels == 9
    sample = torch.randn(1, 9, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference.unet(sample, 500, encoder_hidden_states=text).sample
        for parts in (from_folder, from_file):
            assert (parts.unet(sample, torch.tensor(500), text) - theirs).abs().max() < TOLERANCE
    keys = json.loads((folder / "unet" / "config.json").read_text())
    assert keys["in_channels"] == 9


def test_inpainting_runs_with_taesd_in_bf16_and_with_a_lora(inpainting_model, tmp_path):
    """The fast mode (TAESD decoding and encoding, bf16 networks) and a LoRA change the repainted area only."""
    from safetensors.torch import save_file
    from tiny_models import diffusers_taesd

    _, _, folder = inpainting_model
    diffusers_taesd().save_pretrained(tmp_path / "taesd")
    pipe = Pipeline.from_pretrained(folder, dtype=torch.bfloat16, vae=tmp_path / "taesd")
    call = dict(**COMMON, init_image=init_image(), mask=Inpaint(mask=box_mask(), mask_blur=0), strength=0.8, num_inference_steps=2, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without it is slow, and says so
        plain = np.asarray(pipe(**call).images[0], dtype=np.int16)
        module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
        weight = pipe.unet.get_submodule(module).weight
        generator = torch.Generator().manual_seed(0)
        save_file({
            f"lora_unet_{module.replace('.', '_')}.lora_down.weight": torch.randn(2, weight.shape[1], generator=generator),
            f"lora_unet_{module.replace('.', '_')}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=generator),
        }, str(tmp_path / "style.safetensors"))  # fmt: skip
        pipe.load_lora(tmp_path / "style.safetensors", scale=1.0)
        styled = np.asarray(pipe(**call).images[0], dtype=np.int16)
    outside = np.asarray(box_mask()) == 0
    original = np.asarray(init_image(), dtype=np.int16)
    assert np.array_equal(plain[outside], original[outside]) and np.array_equal(styled[outside], original[outside])
    assert np.abs(plain[~outside] - original[~outside]).mean() > 5
    assert np.abs(styled[~outside] - plain[~outside]).max() > 0


def test_a_controlnet_steers_the_repainted_area_only(plain_model, tmp_path):
    """ControlNet and inpainting together (an ordinary model: the ControlNet sees the latents alone)."""
    from test_controlnet import control_image, random_controlnet

    from ldm.control import ControlUnit

    _, pipe, _ = plain_model
    random_controlnet(diffusers_unet("sd1"), 1).save_pretrained(tmp_path / "controlnet")
    call = dict(**COMMON, init_image=init_image(), mask=Inpaint(mask=box_mask(), mask_blur=0), strength=1.0, num_inference_steps=2, seed=3)
    plain = np.asarray(pipe(**call).images[0], dtype=np.int16)
    steered = np.asarray(pipe(**call, control=ControlUnit(model=str(tmp_path / "controlnet"), image=control_image(0))).images[0], dtype=np.int16)
    outside = np.asarray(box_mask()) == 0
    assert np.array_equal(steered[outside], np.asarray(init_image(), dtype=np.int16)[outside])
    assert np.abs(steered[~outside] - plain[~outside]).max() > 5


def test_a_controlnet_on_an_inpainting_model_matches_diffusers_controlnet_inpainting(inpainting_model, tmp_path):
    """A ControlNet reads the 4 latent channels while the 9-channel U-Net reads the mask and masked latents too:
    diffusers' StableDiffusionControlNetInpaintPipeline on the same weights."""
    from test_controlnet import control_image, random_controlnet

    from ldm.control import ControlUnit

    reference, pipe, _ = inpainting_model
    swap(reference, "ddim")
    net = random_controlnet(diffusers_unet("sd1"), 1)
    net.save_pretrained(tmp_path / "controlnet")
    image, mask, hint = init_image(), box_mask(), control_image(0, size=(64, 64))
    ours = pipe(
        **COMMON, init_image=image, mask=Inpaint(mask=mask, mask_blur=0), strength=1.0, num_inference_steps=3, scheduler="ddim",
        seed=5, control=ControlUnit(model=str(tmp_path / "controlnet"), image=hint), output_type="np",
    ).images[0]  # fmt: skip
    components = {**reference.components, "controlnet": net}
    theirs = diffusers.StableDiffusionControlNetInpaintPipeline(**components)(
        **COMMON, image=image, mask_image=mask, control_image=hint, controlnet_conditioning_scale=1.0, strength=1.0, num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5), output_type="np",
    ).images[0]  # fmt: skip
    inside = (np.asarray(mask) >= 128)[..., None]
    assert np.abs(ours - np.where(inside, theirs, pixels(image))).max() < TOLERANCE


@pytest.mark.parametrize("model", ["plain_model", "inpainting_model"])
def test_the_tiled_decode_mode_encodes_inpaintings_images_in_tiles(request, model, monkeypatch):
    """The image (and an inpainting U-Net's masked image) go through the encoder img2img and the hires pass use."""
    _, pipe, _ = request.getfixturevalue(model)
    seen = []
    tiled_encode = pipe.vae.encode_tiled
    monkeypatch.setattr(pipe.vae, "encode_tiled", lambda x: seen.append(tuple(x.shape)) or tiled_encode(x, tile=8, overlap=4))
    monkeypatch.setattr(pipe.vae, "encode", lambda x: pytest.fail("encoded whole in the tiled mode"))
    pipe.configure(decode_mode="tiled")
    try:
        pipe(**COMMON, init_image=init_image(), mask=box_mask(), strength=0.5, num_inference_steps=2, seed=1, output_type="np")
    finally:
        pipe.configure(decode_mode="full")
    assert seen == [(1, 3, 64, 64)] * (2 if model == "inpainting_model" else 1)


@pytest.mark.parametrize("fill", ["fill", "original", "latent-noise", "latent-nothing"])
def test_every_mode_but_original_encodes_the_filled_image(plain_model, monkeypatch, fill):
    """A1111 runs masking.fill before encoding for every "Masked content" but original (inpainting_fill != 1); the
    latent modes then replace only the latents under the latent mask, so the fill shows in z_0 along its border."""
    from ldm.masks import fill as filled

    _, pipe, _ = plain_model
    seen = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: seen.append(x.clone()) or encode(x))
    options = Inpaint(mask=box_mask(), mask_blur=0, inpainting_fill=fill)
    pipe(**COMMON, init_image=init_image(), mask=options, strength=0.5, num_inference_steps=2, seed=2, output_type="latent")
    expected = init_image() if fill == "original" else filled(init_image(), box_mask())
    assert len(seen) == 1 and torch.equal(seen[0], torch.from_numpy(pixels(expected)).permute(2, 0, 1)[None] * 2 - 1)


def test_only_masked_cuts_the_control_image_to_the_box_as_diffusers_controlnet_inpainting(plain_model, tmp_path):
    """With "only masked" the control image is cut to the generated box as the init image is, then fitted to
    width x height: diffusers' StableDiffusionControlNetInpaintPipeline with padding_mask_crop (its crops_coords)."""
    from test_controlnet import control_image, random_controlnet

    from ldm.control import ControlUnit

    reference, pipe, _ = plain_model
    swap(reference, "ddim")
    net = random_controlnet(diffusers_unet("sd1"), 1)
    net.save_pretrained(tmp_path / "controlnet")
    image, mask, hint = init_image(96, 80), box_mask((30, 20, 50, 36), (96, 80)), control_image(0, size=(96, 80))
    last = {}

    def grab(_, i, t, tensors):
        last["theirs"] = tensors["latents"]
        return tensors

    diffusers.StableDiffusionControlNetInpaintPipeline(**{**reference.components, "controlnet": net})(
        **COMMON, image=image, mask_image=mask, control_image=hint, controlnet_conditioning_scale=1.0, width=64, height=64,
        padding_mask_crop=6, strength=1.0, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(3), callback_on_step_end=grab,
    )  # fmt: skip
    options = Inpaint(mask=mask, mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=6)
    pipe(
        **COMMON, init_image=image, mask=options, width=64, height=64, strength=1.0, num_inference_steps=3, seed=3, scheduler="ddim",
        control=ControlUnit(model=str(tmp_path / "controlnet"), image=hint), callback=lambda i, t, x, x0: last.update(ours=x),
    )  # fmt: skip
    assert (last["ours"] - last["theirs"]).abs().max() < TOLERANCE
