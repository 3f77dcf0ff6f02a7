"""Hires fix (ldm.pipeline.hires): A1111's second txt2img pass, checked against diffusers composed by hand.

diffusers has no hires fix; its users compose one: ``StableDiffusionPipeline`` to latents (or images) at
the base size, the same upscale (torch's ``interpolate`` of the latents, or PIL's Lanczos on the 8-bit
images), then ``StableDiffusionImg2ImgPipeline`` (which takes 4-channel latents as ``image``) with a
generator seeded again from the image's seed, as A1111 seeds its hires pass, over int(N / strength) steps of
which it runs the last N (A1111's rule for ``hr_second_pass_steps`` = N). ldm's result equals that within
1e-4 in fp32 on a random-weight tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import diffusers_pipeline, ldm_pipeline

from ldm.errors import SettingError
from ldm.images import parse_parameters
from ldm.settings import GenerationSettings

TOLERANCE = 1e-4
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=6.0)
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "dpm-solver++": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def models():
    reference = diffusers_pipeline("sd1")
    return reference, ldm_pipeline(reference)


def diffusers_hires(reference, sampler: str, upscaler: str, seed: int, steps: int, hires_steps: int, strength: float, first=None):
    """diffusers' txt2img at 64 x 64 (or the 8-bit ``first`` images given), the upscale to 128 x 128, then its
    img2img: the hires fix by hand."""
    import diffusers

    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(reference.scheduler.config)
    parts = {**reference.components, "scheduler": scheduler}
    txt2img, img2img = diffusers.StableDiffusionPipeline(**parts), diffusers.StableDiffusionImg2ImgPipeline(**parts)
    if first is None:
        first = txt2img(
            **COMMON, num_inference_steps=steps, height=64, width=64, output_type="latent" if upscaler == "latent" else "pil",
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images  # fmt: skip
    if upscaler == "latent":
        image = F.interpolate(first, size=(16, 16), mode="bilinear", antialias=False)
    else:
        image = [picture.resize((128, 128), resample=Image.Resampling.LANCZOS) for picture in first]
    return img2img(
        **COMMON, image=image, strength=strength, num_inference_steps=hires_steps, output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images  # fmt: skip


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_equals_diffusers_txt2img_upscale_img2img(models, sampler, upscaler):
    reference, pipe = models
    first = None
    if upscaler == "lanczos":
        # Lanczos resizes the first pass's 8-bit image: a pixel where ldm's and diffusers' first passes (equal
        # within 1e-6, tests/test_pipeline_parity.py) straddle a rounding level would differ by 1/255, so
        # diffusers' second pass starts from ldm's first image, which the hires pass makes as plain txt2img does.
        first = pipe(**COMMON, scheduler=sampler, num_inference_steps=3, width=64, height=64, seed=21).images
    # 4 hires steps at strength 0.5: A1111 (and ldm) run all 4, the last of an 8-step schedule
    theirs = diffusers_hires(reference, sampler, upscaler, seed=21, steps=3, hires_steps=8, strength=0.5, first=first)
    ours = pipe(
        **COMMON, scheduler=sampler, num_inference_steps=3, width=64, height=64, seed=21,
        hires_scale=2, hires_steps=4, hires_strength=0.5, hires_upscaler=upscaler, output_type="np",
    )  # fmt: skip
    assert ours.images.shape == theirs.shape == (1, 128, 128, 3)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    plain = pipe(**COMMON, scheduler=sampler, num_inference_steps=3, width=128, height=128, seed=21, output_type="np")
    assert np.abs(ours.images - plain.images).max() > 1e-2  # the first pass shaped it, not a txt2img at 128


def test_the_metadata_names_the_hires_pass_as_a1111_writes_it(models):
    _, pipe = models
    out = pipe(**COMMON, num_inference_steps=3, width=64, height=64, seed=5, hires_scale=1.5, hires_steps=4, hires_upscaler="LANCZOS")
    assert out.images[0].size == (96, 96)
    params = out.parameters[0]
    assert (params.width, params.height, params.steps) == (64, 64, 3)  # "Size" is the first pass's, as in A1111
    extra = params.extra
    assert (extra["Hires upscale"], extra["Hires steps"], extra["Hires upscaler"]) == ("1.5", "4", "Lanczos")
    assert extra["Denoising strength"] == "0.7"  # A1111's default for the pass
    latent = pipe(**COMMON, num_inference_steps=3, width=64, height=64, seed=5, hires_scale=2).parameters[0].extra
    assert "Hires steps" not in latent and latent["Hires upscaler"] == "Latent"  # 0 steps: as many as the first pass


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_a_batch_keeps_the_seed_rule(models, upscaler):
    _, pipe = models
    kwargs = dict(**COMMON, num_inference_steps=2, width=64, height=64, hires_scale=2, hires_strength=0.5, hires_upscaler=upscaler)
    batch = pipe(**kwargs, seed=40, num_images_per_prompt=2, output_type="np")
    assert batch.seeds == [40, 41]
    # Lanczos resizes 8-bit images: a batch's float rounding may move a pixel of the first pass by one level
    # (1/255) against a single image's, which the second pass carries on at about 2e-4 (another seed: 0.1).
    tolerance = TOLERANCE if upscaler == "latent" else 1e-3
    for i, seed in enumerate((40, 41)):
        single = pipe(**kwargs, seed=seed, output_type="np").images
        assert np.abs(batch.images[i : i + 1] - single).max() < tolerance
    assert np.abs(batch.images[0] - batch.images[1]).max() > 1e-2


def test_progress_counts_both_passes_and_a_scale_rounds_down_to_the_vae_factor(models):
    _, pipe = models
    steps = []
    out = pipe(**COMMON, num_inference_steps=4, width=64, height=64, seed=1, hires_scale=1.3, hires_steps=10, hires_strength=0.5,
               callback=lambda i, t, x, denoised: steps.append((i, tuple(x.shape))), output_type="pt")  # fmt: skip
    # 64 x 1.3 = 83.2: A1111 makes int(83.2) // 8 = 10 latents, an 80-pixel side; so does ldm
    assert tuple(out.images.shape) == (1, 3, 80, 80)
    assert [i for i, _ in steps] == list(range(4 + 10))  # 4 first-pass steps, then all 10 of the pass (A1111's rule)
    assert {shape for _, shape in steps[4:]} == {(1, 4, 10, 10)}
    assert out.settings.settings.total_steps == 14


def test_bad_hires_settings_are_refused_with_the_field_named():
    with pytest.raises(SettingError, match="hires_scale turns on"):
        GenerationSettings("a", hires_strength=0.5)
    with pytest.raises(SettingError, match="hires_scale turns on"):
        GenerationSettings("a", hires_steps=10)
    with pytest.raises(SettingError, match=r"unknown hires_upscaler 'R-ESRGAN 4x\+'; choose one of Latent, .*Lanczos"):
        GenerationSettings("a", hires_scale=2, hires_upscaler="R-ESRGAN 4x+")
    with pytest.raises(SettingError, match="hires_scale must be 1 or more"):
        GenerationSettings("a", hires_scale=0.5)
    with pytest.raises(SettingError, match=r"hires_strength must be in \(0, 1\]"):
        GenerationSettings("a", hires_scale=2, hires_strength=1.5)
    with pytest.raises(SettingError, match="for img2img give the larger width and height"):
        GenerationSettings("a", hires_scale=2, init_image=Image.new("RGB", (64, 64)))


def test_a_pass_that_cannot_run_is_refused_before_any_work(models):
    from diffusers import HeunDiscreteScheduler

    _, pipe = models
    never = dict(callback=lambda *step: pytest.fail("the first pass ran"))
    with pytest.raises(SettingError, match="hires_steps 600 at hires_strength 0.5 spread over 1200 steps, more than the model's 1000"):
        pipe(**COMMON, num_inference_steps=3, width=64, height=64, seed=1, hires_scale=2, hires_steps=600, hires_strength=0.5, **never)
    heun = HeunDiscreteScheduler.from_config(pipe.scheduler_config.to_diffusers())
    with pytest.raises(SettingError, match="HeunDiscreteScheduler\\) makes 2: use one of ldm's samplers"):
        pipe(**COMMON, num_inference_steps=3, width=64, height=64, seed=1, hires_scale=2, scheduler=heun, **never)
    pipe.configure(max_pixels=100 * 100)
    try:
        with pytest.raises(SettingError, match="128x128 x 1 images"):
            pipe(**COMMON, num_inference_steps=3, width=64, height=64, seed=1, hires_scale=2)
    finally:
        pipe.configure(max_pixels=1024 * 1024 * 4)


def test_the_tiled_decode_mode_encodes_the_hires_and_img2img_inputs_in_tiles(models, monkeypatch):
    _, pipe = models
    seen = []
    tiled_encode = pipe.vae.encode_tiled
    monkeypatch.setattr(pipe.vae, "encode_tiled", lambda x: seen.append(tuple(x.shape)) or tiled_encode(x, tile=8, overlap=4))
    kwargs = dict(**COMMON, num_inference_steps=2, width=64, height=64, seed=2, output_type="np")
    pipe.configure(decode_mode="tiled")
    try:
        pipe(**kwargs, hires_scale=2, hires_upscaler="lanczos")
        pipe(**kwargs, init_image=Image.new("RGB", (64, 64), (200, 40, 40)), strength=0.5)
    finally:
        pipe.configure(decode_mode="full")
    assert seen == [(1, 3, 128, 128), (1, 3, 64, 64)]  # the upscaled images, then img2img's
    pipe(**kwargs, hires_scale=2, hires_upscaler="lanczos")
    assert len(seen) == 2  # the full mode encodes whole (in strips: tests/test_models_vae_strips.py)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    from serving import LiveServer

    from ldm.server.config import Limits, ServerConfig

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        server = LiveServer(ServerConfig(device="cpu", limits=Limits(max_pixels=128 * 128 * 2)))  # the default model
        try:
            with server.client() as client:
                yield client
        finally:
            server.stop()


HIRES_REQUEST = {"prompt": "a red circle", "seed": 3, "width": 64, "height": 64, "steps": 3, "cfg_scale": 3.0, "enable_hr": True,
                 "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4, "denoising_strength": 0.5}  # fmt: skip


def test_the_a1111_api_takes_enable_hr_and_answers_the_upscaled_image_with_its_infotext(http):
    from serving import decode_png

    answer = http.post("/sdapi/v1/txt2img", json=HIRES_REQUEST)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    png = decode_png(body["images"][0])
    assert png.size == (128, 128)
    params = parse_parameters(png.info["parameters"])
    assert (params.width, params.height, params.seed) == (64, 64, 3)
    hires = {key: params.extra[key] for key in ("Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength")}
    assert hires == {"Hires upscale": "2", "Hires steps": "4", "Hires upscaler": "Latent", "Denoising strength": "0.5"}
    info = json.loads(body["info"])
    assert info["denoising_strength"] == 0.5 and info["extra_generation_params"]["Hires upscale"] == "2"
    default = {key: value for key, value in HIRES_REQUEST.items() if key != "denoising_strength"}
    params = parse_parameters(decode_png(http.post("/sdapi/v1/txt2img", json=default).json()["images"][0]).info["parameters"])
    assert params.extra["Denoising strength"] == "0.75"  # A1111's API default (its web UI slider's is 0.7)
    plain = http.post("/sdapi/v1/txt2img", json={**HIRES_REQUEST, "enable_hr": False}).json()
    assert decode_png(plain["images"][0]).size == (64, 64)  # without enable_hr the hr_* fields do nothing, as in A1111


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "choose one of Latent"),
        ({"hr_scale": 3}, "hr_scale", "over this server's limit"),
        ({"hr_resize_x": 256}, "hr_resize_x", "give hr_scale instead"),
        ({"hr_prompt": "a blue square"}, "hr_prompt", "uses the first pass's"),
        ({"denoising_strength": 0}, "denoising_strength", "must be in (0, 1]"),
    ],
)
def test_hires_fields_ldm_cannot_honour_are_a_422_naming_the_field(http, change, field, words):
    answer = http.post("/sdapi/v1/txt2img", json={**HIRES_REQUEST, **change})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", field] and words in detail["msg"]


def test_the_command_line_makes_the_hires_image_and_names_its_flags_in_errors(tmp_path_factory, capsys):
    from tiny_models import save_diffusers_folder

    from ldm.cli import main
    from ldm.images import read_parameters

    model = save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny", "sd1")
    out = tmp_path_factory.mktemp("out")
    argv = ["txt2img", "a cat", "--model", str(model), "--steps", "2", "--width", "64", "--height", "64", "--quiet", "--seed", "4",
            "--out", str(out)]  # fmt: skip
    assert main([*argv, "--hires-scale", "2", "--hires-steps", "2", "--hires-strength", "0.5", "--hires-upscaler", "lanczos"]) == 0
    saved = out / "00000-4.png"
    assert Image.open(saved).size == (128, 128)
    assert read_parameters(saved).extra["Hires upscaler"] == "Lanczos"
    capsys.readouterr()
    assert main([*argv, "--hires-strength", "0.5"]) == 2
    assert "--hires-strength sets the hires pass, which --hires-scale turns on" in capsys.readouterr().err
    assert main([*argv, "--hires-scale", "2", "--hires-upscaler", "esrgan"]) == 2
    assert "unknown --hires-upscaler 'esrgan'; choose one of Latent" in capsys.readouterr().err


def test_prompt_editing_over_the_pass_own_steps_runs_when_weights_are_released_after_use(models):
    """Prompt editing is laid out over the pass's own steps (A1111 schedules the hires prompt for
    ``hr_second_pass_steps``): at 1 first-pass step "[red:blue:1]" reads only "red", at 4 hires steps its
    last two read "blue". A one-shot call frees each network's weights after its last use, so the text
    encoder is kept until the pass has encoded its prompts."""
    from tiny_models import ldm_pipeline

    reference, _ = models
    pipe = ldm_pipeline(reference)
    kwargs = dict(num_inference_steps=1, width=64, height=64, seed=3, hires_scale=2, hires_steps=4, hires_strength=1.0, output_type="np")
    edited = pipe(prompt="a [red:blue:1] cat", **kwargs).images
    red = pipe(prompt="a red cat", **kwargs).images
    assert np.abs(edited - red).max() > 1e-5  # (the same texts throughout would give exactly equal images)
    pipe.configure(weights_after_use="release")
    assert np.array_equal(pipe(prompt="a [red:blue:1] cat", **kwargs).images, edited)


def test_the_pass_runs_every_step_it_is_given_and_its_prompt_editing_reaches_the_end(models):
    """A1111 runs ``hr_second_pass_steps`` = N steps, the last N of int(N / strength), and lays prompt editing
    over those N: "[cat:dog:0.5]" at 8 hires steps and strength 0.5 reads "cat", then "dog"."""
    from ldm.pipeline import hires, stages

    _, pipe = models
    settings = GenerationSettings("a [cat:dog:0.5]", num_inference_steps=8, width=64, height=64, seed=2, hires_scale=2, hires_steps=8, hires_strength=0.5)
    call = stages.resolve(pipe, settings, None, None, None)
    second = hires.second_call(pipe, call, torch.zeros(1, 4, 8, 8))
    assert (second.settings.num_inference_steps, second.kept_steps) == (16, 8)
    assert len(stages.prepare_timesteps(pipe, second)) == 8
    texts = [second.plan.texts[row] for row in second.plan.cond[0][0]]
    assert len(texts) == 8 and texts[0] == "a cat" and texts[-1] == "a dog"
