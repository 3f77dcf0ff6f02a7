"""SDXL generation: tiny random-weight SDXL base and refiner (tests/tiny_sdxl.py) saved as diffusers folders, loaded
by ldm, against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on the same weights (max abs
difference < 1e-4 in [0, 1] pixels, fp32)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tiny_sdxl
from test_training_support import one_torch_thread  # noqa: F401 - an autouse fixture: one torch thread per module

from ldm.errors import InputError, SettingError
from ldm.pipeline import Pipeline
from ldm.sdxl import SdxlOptions

TOLERANCE = 1e-4
SIZE = dict(height=32, width=32)
COMMON = dict(prompt="a photo of a red cat", guidance_scale=7.5, output_type="np", num_inference_steps=4, **SIZE)
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler"}


# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (and the refiner's), verbatim: it carries the keys
# other samplers read (set_alpha_to_one) that an EulerDiscreteScheduler's save_pretrained would leave out.
RELEASED_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("sdxl")
    folders = {kind: tiny_sdxl.save_folder(root / kind, kind) for kind in ("base", "refiner")}
    for folder in folders.values():
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(RELEASED_SCHEDULER, indent=2))
    return folders


@pytest.fixture(scope="module")
def base(folders):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(folders["base"])
    reference.set_progress_bar_config(disable=True)
    reference.loaded_scheduler = reference.scheduler
    return reference, Pipeline.from_pretrained(folders["base"])


@pytest.fixture(scope="module")
def refiner(folders):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"])
    reference.set_progress_bar_config(disable=True)
    return reference, Pipeline.from_pretrained(folders["refiner"])


def swapped(reference, name: str):
    import diffusers

    reference.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(reference.loaded_scheduler.config)
    return reference


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_txt2img_matches_diffusers_with_a_negative_prompt(base, scheduler):
    reference, pipe = base
    theirs = swapped(reference, scheduler)(**COMMON, negative_prompt="blurry, dark", generator=generator(5)).images
    ours = pipe(**COMMON, negative_prompt="blurry, dark", scheduler=scheduler, seed=5)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    assert (ours.settings.settings.width, ours.settings.settings.height) == (32, 32)


def test_an_empty_negative_prompt_is_zeros_as_diffusers_without_one(base):
    """force_zeros_for_empty_prompt (the base's): diffusers zeroes the negative it is not given; ldm an empty one."""
    reference, pipe = base
    assert pipe.force_zeros_for_empty_prompt
    theirs = swapped(reference, "euler")(**COMMON, generator=generator(2)).images
    ours = pipe(**COMMON, scheduler="euler", seed=2).images
    assert np.abs(ours - theirs).max() < TOLERANCE
    encoded = swapped(reference, "euler")(**COMMON, negative_prompt="", generator=generator(2)).images
    assert np.abs(ours - encoded).max() > 1e-3  # zeros, not the encoding of ""


def test_prompt_2_micro_conditioning_and_clip_skip_match_diffusers(base):
    reference, pipe = base
    call = dict(
        prompt_2="an oil painting", negative_prompt="blurry", negative_prompt_2="grainy", original_size=(512, 768),
        crops_coords_top_left=(16, 0), target_size=(48, 32), negative_original_size=(256, 256), negative_target_size=(48, 32),
    )  # fmt: skip
    theirs = swapped(reference, "euler")(**COMMON, **call, generator=generator(9)).images
    options = SdxlOptions(  # the negative crop left out: diffusers' (0, 0), not the conditional (16, 0)
        original_size=(512, 768), crops_coords_top_left=(16, 0), target_size=(48, 32), negative_original_size=(256, 256),
        negative_target_size=(48, 32),
    )  # fmt: skip
    ours = pipe(**COMMON, prompt_2="an oil painting", negative_prompt="blurry", negative_prompt_2="grainy", sdxl=options, scheduler="euler", seed=9)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    plain = pipe(**COMMON, negative_prompt="blurry", scheduler="euler", seed=9).images
    assert np.abs(ours.images - plain).max() > 1e-3
    # One negative size alone: diffusers reads the conditional numbers for the unconditional rows too.
    half = dict(original_size=(512, 768), crops_coords_top_left=(16, 0), negative_original_size=(256, 256))
    theirs = swapped(reference, "euler")(**COMMON, negative_prompt="blurry", **half, generator=generator(9)).images
    ours = pipe(**COMMON, negative_prompt="blurry", sdxl=SdxlOptions(**half), scheduler="euler", seed=9).images
    assert np.abs(ours - theirs).max() < TOLERANCE
    # clip_skip: diffusers skips layers for the prompt only; with the empty (zeroed) negative both agree.
    theirs = swapped(reference, "euler")(**COMMON, clip_skip=1, generator=generator(9)).images
    assert np.abs(pipe(**COMMON, clip_skip=1, scheduler="euler", seed=9).images - theirs).max() < TOLERANCE


def test_a_batch_keeps_the_seed_rule_and_matches_diffusers(base):
    reference, pipe = base
    generators = [generator(40), generator(41)]
    theirs = swapped(reference, "euler-ancestral")(**COMMON, negative_prompt="dark", num_images_per_prompt=2, generator=generators).images
    batch = pipe(**COMMON, negative_prompt="dark", num_images_per_prompt=2, scheduler="euler-ancestral", seed=40)
    assert batch.seeds == [40, 41]
    assert np.abs(batch.images - theirs).max() < TOLERANCE
    second = pipe(**COMMON, negative_prompt="dark", scheduler="euler-ancestral", seed=41).images
    assert np.abs(batch.images[1:] - second).max() < TOLERANCE


def test_a_long_prompt_keeps_its_chunks_where_diffusers_cuts_it(base):
    """ldm (as A1111) encodes every 75-token chunk on both encoders and pools the first; diffusers keeps 77 tokens.
    The first chunk and the pooled embedding are diffusers' own."""
    from ldm.pipeline import stages
    from ldm.settings import GenerationSettings

    reference, pipe = base
    prompt = " ".join(["cat"] * 100)
    theirs, _, pooled, _ = reference.encode_prompt(prompt, do_classifier_free_guidance=False)
    call = stages.resolve(pipe, GenerationSettings(prompt, guidance_scale=1.0, **SIZE), None, None, None)
    text = stages.encode_prompts(pipe, call)
    assert text.states.shape == (1, 154, tiny_sdxl.CLIP_L_WIDTH + tiny_sdxl.BIGG_WIDTH)
    assert (text.states[:, :77] - theirs).abs().max() < 1e-5
    assert (text.pooled - pooled).abs().max() < 1e-5
    long = pipe(prompt, guidance_scale=1.0, output_type="np", num_inference_steps=3, seed=1, **SIZE).images
    cut = reference(prompt, guidance_scale=1.0, output_type="np", num_inference_steps=3, generator=generator(1), **SIZE).images
    assert np.abs(long - cut).max() > 1e-4  # the second chunk reaches the U-Net


def test_img2img_matches_diffusers_on_the_refiner(refiner):
    reference, pipe = refiner
    image = np.random.default_rng(0).random((32, 32, 3))
    from PIL import Image

    init = Image.fromarray((image * 255).astype(np.uint8))
    call = dict(prompt="a red cat", negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=5, strength=0.6, output_type="np")
    theirs = reference(**call, image=init, aesthetic_score=7.0, generator=generator(3)).images
    ours = pipe(**call, init_image=init, sdxl=SdxlOptions(aesthetic_score=7.0), scheduler="euler", seed=3)
    assert not pipe.force_zeros_for_empty_prompt
    assert np.abs(ours.images - theirs).max() < TOLERANCE


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_the_refiner_hand_off_matches_diffusers_ensemble_of_experts(base, refiner, scheduler):
    (reference, pipe), (reference_refiner, refiner_pipe) = base, refiner
    import diffusers

    reference_refiner.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(reference_refiner.scheduler.config)
    call = dict(prompt="a red cat", negative_prompt="blurry", guidance_scale=7.0, num_inference_steps=5)
    generators = [generator(11)]
    latents = swapped(reference, scheduler)(**call, **SIZE, denoising_end=0.6, output_type="latent", generator=generators).images
    theirs = reference_refiner(**call, image=latents, denoising_start=0.6, output_type="np", generator=generators).images
    ours = pipe(**call, **SIZE, scheduler=scheduler, refiner=refiner_pipe, refiner_switch=0.6, output_type="np", seed=11)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    assert ours.parameters[0].extra["Refiner switch at"] == "0.6"
    # The two calls of diffusers' recipe, in ldm, one generator going on from the first call to the second.
    shared = generator(11)
    first = pipe(**call, **SIZE, scheduler=scheduler, sdxl=SdxlOptions(denoising_end=0.6), output_type="latent", generator=shared)
    second = refiner_pipe(**call, **SIZE, latents=first.images, scheduler=scheduler, sdxl=SdxlOptions(denoising_start=0.6), output_type="np", generator=shared)
    assert np.abs(second.images - theirs).max() < TOLERANCE


def test_bad_sdxl_input_is_refused_in_one_line(base):
    _, pipe = base
    with pytest.raises(SettingError, match="original_size"):
        SdxlOptions(original_size=(0, 10))
    with pytest.raises(SettingError, match="denoising_end"):
        SdxlOptions(denoising_end=1.5)
    with pytest.raises(SettingError, match="refiner_switch"):
        pipe("a cat", refiner_switch=0.5, **SIZE)
    with pytest.raises(SettingError, match="prompt_2"):
        pipe("a cat", prompt_2=["a", "b"], **SIZE)
    with pytest.raises(SettingError, match="hires_scale: the hires fix beside a refiner or denoising_start/end"):
        pipe("a cat", hires_scale=2.0, sdxl=SdxlOptions(denoising_end=0.8), output_type="latent", **SIZE)
    with pytest.raises(InputError, match="latents"):
        pipe("a cat", sdxl=SdxlOptions(denoising_start=0.5), **SIZE)
    with pytest.raises(InputError, match="no refiner"):
        pipe("a cat", refiner="no-such-refiner", **SIZE)


def test_the_native_size_is_sdxl_s_1024(base):
    from ldm.pipeline import stages
    from ldm.settings import GenerationSettings

    call = stages.resolve(base[1], GenerationSettings("a cat"), None, None, None)
    assert (call.settings.width, call.settings.height, call.shape) == (1024, 1024, (1, 4, 128, 128))


def test_the_command_line_writes_an_sdxl_image_refined_with_its_metadata(folders, base, tmp_path, capsys):
    from ldm.cli import main
    from ldm.images import read_parameters

    files = {}
    for kind, folder in folders.items():
        files[kind] = tmp_path / f"tiny-{kind}.safetensors"
        assert main(["convert", str(folder), str(files[kind])]) == 0
    out = tmp_path / "out"
    argv = ["a red cat", "--negative-prompt", "blurry", "--model", files["base"], "--refiner", files["refiner"], "--refiner-switch",
            "0.5", "--scheduler", "euler", "--steps", "4", "--width", "32", "--height", "32", "--seed", "7", "--out", out, "--quiet"]  # fmt: skip
    assert main(["txt2img", *map(str, argv)]) == 0
    capsys.readouterr()
    params = read_parameters(out / "00000-7.png")
    assert (params.model, params.width, params.height, params.seed) == ("tiny-base", 32, 32, 7)
    assert params.extra["Refiner"].startswith("tiny-refiner [") and params.extra["Refiner switch at"] == "0.5"
    refiner = Pipeline.from_pretrained(files["refiner"])
    again = Pipeline.from_pretrained(files["base"])(
        "a red cat", negative_prompt="blurry", refiner=refiner, refiner_switch=0.5, scheduler="euler", num_inference_steps=4, seed=7, **SIZE
    ).images[0]  # fmt: skip
    from PIL import Image

    assert np.abs(np.asarray(Image.open(out / "00000-7.png"), dtype=int) - np.asarray(again, dtype=int)).max() <= 1
    assert main(["txt2img", "a cat", "--model", str(files["base"]), "--refiner-switch", "0.5", "--out", str(out)]) == 2
    assert "--refiner-switch" in capsys.readouterr().err


# The micro-conditioning flags' values (diffusers' order) and what the refiner reads of them.
MICRO = dict(
    original_size=(2048, 1536), crops_coords_top_left=(16, 8), target_size=(48, 32), negative_original_size=(256, 256),
    negative_crops_coords_top_left=(8, 0), negative_target_size=(32, 32), aesthetic_score=7.5, negative_aesthetic_score=1.5,
)  # fmt: skip


def test_the_command_line_micro_conditioning_makes_the_python_call_s_image(folders, base, refiner, tmp_path, capsys):
    """ldm txt2img's SDXL flags are SdxlOptions: the base reads the sizes, the refiner the scores; the PNG records each
    value as its flag takes it, and an aesthetic score on a base without a refiner is refused naming the flag."""
    from PIL import Image

    from ldm.cli import main
    from ldm.images import read_parameters

    flags = [f"--{name.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for name, v in MICRO.items()]
    common = ["a red cat", "--negative-prompt", "blurry", "--model", folders["base"], "--scheduler", "euler", "--steps", "4",
              "--width", "32", "--height", "32", "--seed", "7", "--quiet"]  # fmt: skip
    argv = [*common, "--refiner", folders["refiner"], "--refiner-switch", "0.5", "--out", tmp_path / "out", *flags]
    assert main(["txt2img", *map(str, argv)]) == 0
    call = dict(negative_prompt="blurry", scheduler="euler", num_inference_steps=4, seed=7, refiner=refiner[1], refiner_switch=0.5, **SIZE)
    expected = base[1]("a red cat", sdxl=SdxlOptions(**MICRO), **call).images[0]
    written = tmp_path / "out" / "00000-7.png"
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(expected))
    for name in ("target_size", "aesthetic_score"):  # each reaches its model: the base's sizes, the refiner's score
        other = {**MICRO, name: (64, 64) if name == "target_size" else 3.0}
        assert not np.array_equal(np.asarray(base[1]("a red cat", sdxl=SdxlOptions(**other), **call).images[0]), np.asarray(expected))
    extra = read_parameters(written).extra
    for flag in flags:
        name, value = flag.removeprefix("--").split("=")
        assert extra[name.replace("-", " ").capitalize()] == value
    capsys.readouterr()
    assert main(["txt2img", *map(str, [*common, "--aesthetic-score", "7", "--out", tmp_path / "base-only"])]) == 2
    assert "--aesthetic-score is read by an SDXL refiner" in capsys.readouterr().err


def test_the_negative_crop_and_the_refiner_s_negative_numbers_match_diffusers(base, refiner):
    reference, pipe = base
    negative = dict(negative_original_size=(256, 256), negative_crops_coords_top_left=(8, 0), negative_target_size=(32, 32))
    theirs = swapped(reference, "euler")(**COMMON, negative_prompt="blurry", **negative, generator=generator(4)).images
    ours = pipe(**COMMON, negative_prompt="blurry", sdxl=SdxlOptions(**negative), scheduler="euler", seed=4).images
    assert np.abs(ours - theirs).max() < TOLERANCE
    uncropped = SdxlOptions(**{**negative, "negative_crops_coords_top_left": (0, 0)})
    assert np.abs(ours - pipe(**COMMON, negative_prompt="blurry", sdxl=uncropped, scheduler="euler", seed=4).images).max() > 1e-3
    reference, pipe = refiner
    from PIL import Image

    init = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    scores = dict(negative_original_size=(64, 48), negative_crops_coords_top_left=(4, 4), negative_aesthetic_score=1.0)
    call = dict(prompt="a red cat", negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=4, strength=0.7, output_type="np")
    import diffusers

    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)  # another test's may be set
    theirs = reference(**call, image=init, **scores, generator=generator(6)).images
    ours = pipe(**call, init_image=init, sdxl=SdxlOptions(**scores), scheduler="euler", seed=6).images
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_a_lora_tag_on_sdxl_is_diffusers_fused_lora_and_leaves_no_trace(folders, tmp_path):
    """<lora:NAME:W> on SDXL, end to end: a kohya file (lora_unet_, lora_te1_, lora_te2_ on every layer) found in the
    loras folder gives diffusers' image with load_lora_weights + fuse_lora(lora_scale=W), the PNG gets A1111's
    "Lora hashes", and the next call without the tag is the plain image again, bit for bit."""
    import hashlib

    from diffusers import StableDiffusionXLPipeline
    from test_sdxl_adapters import kohya, networks, random_pairs, write

    reference = StableDiffusionXLPipeline.from_pretrained(folders["base"])
    reference.set_progress_bar_config(disable=True)
    (tmp_path / "loras" / "xl").mkdir(parents=True)
    path = write(tmp_path / "loras" / "xl" / "xlstyle.safetensors", random_pairs(networks(reference), seed=1), kohya(original=True), alpha=1.0)
    pipe = Pipeline.from_pretrained(folders["base"]).configure(loras_dir=tmp_path / "loras")
    call = dict(COMMON, negative_prompt="blurry", scheduler="euler", seed=3)
    plain = pipe(**call).images
    tagged = pipe(**{**call, "prompt": COMMON["prompt"] + " <lora:xlstyle:0.6>"})
    reference.load_lora_weights(str(path))
    reference.fuse_lora(lora_scale=0.6)  # SDXL's components: the U-Net and both text encoders
    theirs = reference(**{**COMMON, "negative_prompt": "blurry"}, generator=generator(3)).images
    assert np.abs(tagged.images - theirs).max() < TOLERANCE
    assert np.abs(tagged.images - plain).max() > 1e-3
    data = path.read_bytes()
    digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]  # A1111: the tensors' bytes
    assert tagged.parameters[0].extra["Lora hashes"] == f"xlstyle: {digest}"
    again = pipe(**call)
    assert np.array_equal(again.images, plain) and "Lora hashes" not in again.parameters[0].extra


def test_a_one_shot_call_pads_the_shorter_prompt_before_releasing_the_encoders(folders, base):
    """weights_after_use="release" (a one-shot ldm txt2img) frees each text encoder after its last use, which for a
    prompt_2 shorter than the prompt is the padding of the shorter one: the image is the kept pipeline's."""
    call = dict(COMMON, prompt="a red cat BREAK a blue sky", prompt_2="an oil painting", negative_prompt="blurry", scheduler="euler", seed=2)
    kept = base[1](**call).images
    one_shot = Pipeline.from_pretrained(folders["base"]).configure(weights_after_use="release")
    assert np.abs(one_shot(**call).images - kept).max() < 1e-6
    assert next(one_shot.text_encoder.parameters()).is_meta  # released after the call, as a one-shot run's are


def test_every_sampler_matches_diffusers_on_sdxl(base):
    """The samplers see only the denoiser: SDXL's conditioning changes nothing of them (tests/test_pipeline_parity.py)."""
    import diffusers
    from test_pipeline_parity import SAMPLERS, ours_for

    reference, pipe = base
    for sampler, (class_name, options, call) in SAMPLERS.items():
        reference.scheduler = getattr(diffusers, class_name).from_config(reference.loaded_scheduler.config, **options)
        common = {**COMMON, "num_inference_steps": 3, "negative_prompt": "dark", **call}
        theirs = reference(**common, generator=generator(21)).images
        ours = pipe(**common, **{k: v for k, v in ours_for(sampler).items() if k not in call}, seed=21).images
        assert np.abs(ours - theirs).max() < TOLERANCE, sampler


def test_the_a1111_api_refines_with_a_listed_model_as_python_does(folders, base, tmp_path_factory):
    """A1111's ``refiner_checkpoint`` (a model of the server's models folder) and ``refiner_switch_at``."""
    import shutil

    from serving import LiveServer, decode_png

    from ldm.images import parse_parameters
    from ldm.server.config import ServerConfig

    models = tmp_path_factory.mktemp("models")
    for kind in ("base", "refiner"):
        shutil.copytree(folders[kind], models / f"sdxl-{kind}")
    call = dict(prompt="a red cat", negative_prompt="blurry", guidance_scale=7.0, num_inference_steps=4, seed=5, **SIZE)
    expected = base[1](**call, refiner=folders["refiner"], refiner_switch=0.5, output_type="np").images[0]
    request = {"prompt": "a red cat", "negative_prompt": "blurry", "cfg_scale": 7.0, "steps": 4, "seed": 5, "sampler_name": "DPM++ 2M",
               "width": SIZE["width"], "height": SIZE["height"], "refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 0.5}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        server = LiveServer(ServerConfig(device="cpu", model=models / "sdxl-base", models_dir=models))
        try:
            with server.client() as client:
                answer = client.post("/sdapi/v1/txt2img", json=request)
                assert answer.status_code == 200, answer.text
                image = decode_png(answer.json()["images"][0])
                missing = client.post("/sdapi/v1/txt2img", json={**request, "refiner_checkpoint": "nope"})
        finally:
            server.stop()
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - expected).max() <= 1 / 255 + 1e-6
    assert parse_parameters(image.info["parameters"]).extra["Refiner switch at"] == "0.5"
    assert missing.status_code == 404 and "refiner_checkpoint 'nope' not found" in missing.text


def test_the_server_holds_one_refiner_at_a_time(folders, base, tmp_path_factory):
    """Two requests naming two refiners (two copies of one model): the second releases the first, which is freed,
    and each image is the Python call's."""
    import gc
    import shutil
    import weakref

    from serving import LiveServer, decode_png

    from ldm.server.config import ServerConfig

    models = tmp_path_factory.mktemp("models")
    shutil.copytree(folders["base"], models / "sdxl-base")
    for name in ("refiner-a", "refiner-b"):
        shutil.copytree(folders["refiner"], models / name)
    call = dict(prompt="a red cat", negative_prompt="blurry", guidance_scale=7.0, num_inference_steps=4, seed=5, **SIZE)
    expected = base[1](**call, refiner=folders["refiner"], refiner_switch=0.5, output_type="np").images[0]
    request = {"prompt": "a red cat", "negative_prompt": "blurry", "cfg_scale": 7.0, "steps": 4, "seed": 5, "sampler_name": "DPM++ 2M",
               "width": SIZE["width"], "height": SIZE["height"], "refiner_switch_at": 0.5}  # fmt: skip
    images, resident = [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        server = LiveServer(ServerConfig(device="cpu", model=models / "sdxl-base", models_dir=models))
        try:
            with server.client() as client:
                for name in ("refiner-a", "refiner-b"):
                    answer = client.post("/sdapi/v1/txt2img", json={**request, "refiner_checkpoint": name})
                    assert answer.status_code == 200, answer.text
                    images.append(decode_png(answer.json()["images"][0]))
                    refiners = server.server_state.engine.pipeline.refiners.named
                    resident.append((list(refiners), [weakref.ref(pipe) for pipe in refiners.values()]))
        finally:
            server.stop()
    assert [names for names, _ in resident] == [[str(models / "refiner-a")], [str(models / "refiner-b")]]
    gc.collect()
    assert resident[0][1][0]() is None  # released, not only forgotten by name
    for image in images:
        assert np.abs(np.asarray(image, dtype=np.float32) / 255 - expected).max() <= 1 / 255 + 1e-6


def test_the_a1111_api_ignores_clip_skip_on_sdxl_as_a1111_does(folders, base, tmp_path_factory):
    """A1111 (sdxl_clip_l_skip off, its default) reads SDXL's penultimate layers whatever CLIP_stop_at_last_layers says:
    a request's override and the server's option leave the image as without them; Python keeps diffusers' clip skip."""
    from serving import LiveServer, decode_png

    from ldm.images import parse_parameters
    from ldm.server.config import ServerConfig

    call = dict(prompt="a red cat", negative_prompt="blurry", guidance_scale=7.0, num_inference_steps=3, seed=5, **SIZE)
    expected = base[1](**call, output_type="np").images[0]
    assert np.abs(base[1](**call, clip_skip=1, output_type="np").images[0] - expected).max() > 1e-2  # Python: diffusers' meaning
    request = {"prompt": "a red cat", "negative_prompt": "blurry", "cfg_scale": 7.0, "steps": 3, "seed": 5, "sampler_name": "DPM++ 2M",
               "width": SIZE["width"], "height": SIZE["height"], "override_settings": {"CLIP_stop_at_last_layers": 2}}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        server = LiveServer(ServerConfig(device="cpu", model=folders["base"]))
        try:
            with server.client() as client:
                answers = [client.post("/sdapi/v1/txt2img", json=request)]
                assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
                answers.append(client.post("/sdapi/v1/txt2img", json={**request, "override_settings": {}}))
                refused = client.post("/sdapi/v1/txt2img", json={**request, "override_settings": {"sdxl_clip_l_skip": True}})
        finally:
            server.stop()
    for answer in answers:
        assert answer.status_code == 200, answer.text
        image = decode_png(answer.json()["images"][0])
        assert np.abs(np.asarray(image, dtype=np.float32) / 255 - expected).max() <= 1 / 255 + 1e-6
        assert "Clip skip" not in parse_parameters(image.info["parameters"]).extra  # it made no difference
    assert refused.status_code == 422 and "override_settings.sdxl_clip_l_skip" in refused.text


def test_the_turbo_recipe_and_taesdxl_match_diffusers(folders, tmp_path):
    """SDXL-Turbo's recipe (Euler a on trailing timesteps, one step, no guidance) and the tiny autoencoder
    (TAESDXL: TAESD's network with SDXL's weights) in place of the KL-VAE, against diffusers' SDXL pipeline."""
    import diffusers
    from tiny_models import diffusers_taesd

    taesd = diffusers_taesd(seed=3)
    taesd.save_pretrained(tmp_path / "taesdxl")
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folders["base"], vae=taesd)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config, timestep_spacing="trailing")
    pipe = Pipeline.from_pretrained(folders["base"], vae=tmp_path / "taesdxl")
    for steps in (1, 2):
        call = dict(prompt="a red cat", num_inference_steps=steps, guidance_scale=0.0, **SIZE)
        theirs = reference(**call, generator=generator(9), output_type="np").images
        ours = pipe(**call, scheduler="euler-ancestral", timestep_spacing="trailing", seed=9, output_type="np").images
        assert np.abs(ours - theirs).max() < TOLERANCE, steps


def test_bf16_on_the_cpu_stays_near_fp32(folders, base):
    """bf16 weights (channels-last on the CPU, as for SD) make the same picture as fp32 within bf16's precision."""
    pipe32 = base[1]
    pipe16 = Pipeline.from_pretrained(folders["base"], dtype=torch.bfloat16)
    assert next(pipe16.text_encoder_2.parameters()).dtype == torch.bfloat16
    call = dict(COMMON, negative_prompt="blurry", scheduler="euler", seed=4)
    full, half = pipe32(**call).images, pipe16(**call).images
    assert np.abs(half - full).mean() < 0.01 and np.abs(half - full).max() < 0.05


def test_an_sdxl_vae_file_keeps_sdxl_s_scale_and_an_sd_folder_vae_never_upcasts(folders, base, tmp_path):
    """A KL-VAE file says nothing of its scale: on an SDXL model it is SDXL's 0.13025 with fp32 decodes in fp16
    (A1111 takes the model's scale), so the model's own VAE as a file gives the same image."""
    from safetensors.torch import load_file, save_file

    from ldm.loading import load_components, save_single_file
    from tiny_models import save_diffusers_folder

    whole = load_file(save_single_file(load_components(folders["base"]), tmp_path / "base.safetensors"))
    save_file({key: value for key, value in whole.items() if key.startswith("first_stage_model.")}, tmp_path / "sdxl_vae.safetensors")
    pipe = Pipeline.from_pretrained(folders["base"])
    before = pipe(**COMMON, scheduler="euler", seed=3).images
    pipe.load_vae(tmp_path / "sdxl_vae.safetensors")
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.force_upcast) == (0.13025, True)
    assert np.array_equal(pipe(**COMMON, scheduler="euler", seed=3).images, before)
    sd = Pipeline.from_pretrained(save_diffusers_folder(tmp_path / "sd"))
    sd.load_vae(tmp_path / "sd" / "vae")  # diffusers writes force_upcast=true into every VAE config
    assert sd.vae.config.force_upcast is False and sd.vae.config.scaling_factor == 0.18215


def test_prompt_editing_goes_on_across_the_refiner_hand_off(base, refiner):
    """A1111 switches models inside one sampling loop, so its step count (and the prompt schedule it reads) goes
    on across the switch: "[a cat:a dog:0.5]" over 8 steps reads "a dog" in the refiner's last 20 %, and the
    step callback counts on from the base's steps."""
    pipe = refiner[1]
    x = torch.randn(1, 4, 4, 4, generator=generator(0))
    call = dict(**SIZE, num_inference_steps=8, output_type="np", seed=1, negative_prompt="x", sdxl=SdxlOptions(denoising_start=0.8), latents=x)
    edited, dog = pipe(prompt="[a cat:a dog:0.5]", **call).images, pipe(prompt="a dog", **call).images
    assert np.array_equal(edited, dog)
    steps = []
    base[1](prompt="a cat", **SIZE, num_inference_steps=5, seed=2, refiner=pipe, refiner_switch=0.6, output_type="latent",
            callback=lambda i, t, latents, denoised: steps.append(i))  # fmt: skip
    assert steps == list(range(len(steps))) and len(steps) == 5


def test_sdxl_clip_l_skip_is_refused_only_where_a_clip_skip_would_apply():
    """Without a clip skip A1111's sdxl_clip_l_skip changes nothing on any model (clients send all their options)."""
    from ldm.errors import SettingError
    from ldm.server.translate import ServerDefaults, clip_skip_of

    assert clip_skip_of({"sdxl_clip_l_skip": True}, ServerDefaults()) is None
    assert clip_skip_of({"sdxl_clip_l_skip": True, "CLIP_stop_at_last_layers": 1}, ServerDefaults()) is None
    for overrides, defaults in (({"CLIP_stop_at_last_layers": 2}, ServerDefaults()), ({}, ServerDefaults(clip_skip=1))):
        with pytest.raises(SettingError, match="sdxl_clip_l_skip"):
            clip_skip_of({"sdxl_clip_l_skip": True, **overrides}, defaults)


def community_file(folder, path, markers: dict[str, tuple[int, ...]]):
    """The base model as a single file the way community checkpoints come: SD's keys, ComfyUI's marker keys
    (``v_pred``, ``ztsnr``...), and no ldm metadata (so the markers alone say what the model is)."""
    from safetensors.torch import load_file, save_file

    from ldm.loading import load_components, save_single_file

    written = save_single_file(load_components(folder), path.with_name("ldm-" + path.name))
    state = {key: value for key, value in load_file(written).items() if key not in ("v_pred", "ztsnr")}
    state.update({key: torch.zeros(shape) for key, shape in markers.items()})
    save_file(state, path, metadata={"format": "pt"})
    return path


def test_a_zero_terminal_snr_v_prediction_file_samples_as_diffusers_configured_so(folders, base, tmp_path, capsys):
    """ComfyUI's ``v_pred`` + ``ztsnr`` markers (NoobAI-XL v-pred and its merges): v-prediction over betas rescaled
    to zero terminal SNR, against diffusers' pipeline with that scheduler config; ``ldm convert`` keeps both."""
    import diffusers

    from ldm.cli import main

    path = community_file(folders["base"], tmp_path / "vpred-ztsnr.safetensors", {"v_pred": (0,), "ztsnr": (0,)})
    pipe = Pipeline.from_pretrained(path)
    assert pipe.scheduler_config.prediction_type == "v_prediction" and pipe.scheduler_config.rescale_betas_zero_snr
    reference, _ = base
    images = {}
    for zero_snr in (True, False):
        reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(
            reference.loaded_scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr
        )
        images[zero_snr] = reference(**COMMON, generator=generator(4)).images
    ours = pipe(**COMMON, scheduler="euler", seed=4).images
    assert np.abs(ours - images[True]).max() < TOLERANCE
    assert np.abs(ours - images[False]).max() > 1e-3  # the marker changes the picture
    converted = tmp_path / "converted.safetensors"
    assert main(["convert", str(path), str(converted)]) == 0
    from safetensors import safe_open

    with safe_open(converted, "pt") as written:  # the markers, as ComfyUI reads them; no ldm scheduler metadata
        assert {"v_pred", "ztsnr"} <= set(written.keys()) and "ldm.scheduler_config" not in written.metadata()
    again = Pipeline.from_pretrained(converted).scheduler_config
    assert again.prediction_type == "v_prediction" and again.rescale_betas_zero_snr
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert "zero terminal SNR (ztsnr key)" in capsys.readouterr().out


@pytest.mark.parametrize("marker", ["edm_vpred.sigma_max", "edm_mean"])
def test_an_edm_model_is_refused_by_its_marker(folders, tmp_path, capsys, marker):
    """Playground v2.5 (edm_mean / edm_std) and CosXL (edm_vpred.sigma_max): not DDPM models, so not sampled as one."""
    from ldm.cli import main
    from ldm.errors import CheckpointError

    path = community_file(folders["base"], tmp_path / "edm.safetensors", {marker: (), "edm_std" if marker == "edm_mean" else "v_pred": ()})
    with pytest.raises(CheckpointError, match=rf"EDM model \(key '{re.escape(marker)}'\)"):
        Pipeline.from_pretrained(path)
    assert main(["txt2img", "a cat", "--model", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"key '{marker}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert main(["info", str(path)]) == 0
    assert f"EDM ({marker} key)" in capsys.readouterr().out


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_the_hires_fix_is_diffusers_txt2img_upscale_then_img2img_at_the_larger_size(folders, base, upscaler):
    """A1111's hires fix on SDXL (tests/test_hires.py for SD): diffusers' SDXL txt2img at 32 x 32, the same upscale,
    then its SDXL img2img with a generator seeded again, whose micro-conditioning sizes are the upscaled image's
    (A1111 conditions its hires pass on that size); the pass runs 4 steps, the last of 8 at strength 0.5."""
    import diffusers
    import torch.nn.functional as F
    from PIL import Image

    reference, pipe = base
    call = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=6.0)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.loaded_scheduler.config)
    parts = {**reference.components, "scheduler": scheduler}
    if upscaler == "latent":
        first = diffusers.StableDiffusionXLPipeline(**parts)(
            **call, num_inference_steps=3, output_type="latent", generator=generator(21), **SIZE
        ).images
        image = F.interpolate(first, size=(8, 8), mode="bilinear", antialias=False)
    else:  # ldm's first image (equal to diffusers' within 1e-4): a pixel on a rounding level would differ by 1/255
        first = pipe(**call, num_inference_steps=3, scheduler="euler", seed=21, **SIZE).images
        image = [picture.resize((64, 64), resample=Image.Resampling.LANCZOS) for picture in first]
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=False)
    img2img.set_progress_bar_config(disable=True)
    theirs = img2img(**call, image=image, strength=0.5, num_inference_steps=8, output_type="np", generator=generator(21)).images
    ours = pipe(
        **call, num_inference_steps=3, scheduler="euler", seed=21, hires_scale=2, hires_steps=4, hires_strength=0.5,
        hires_upscaler=upscaler, output_type="np", **SIZE,
    ).images  # fmt: skip
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() < TOLERANCE
    first_size = img2img(
        **call, image=image, strength=0.5, num_inference_steps=8, output_type="np", generator=generator(21),
        original_size=(32, 32), target_size=(32, 32),
    ).images  # fmt: skip
    assert np.abs(ours - first_size).max() > 1e-3  # the pass is conditioned on its own size, not the first pass's


def test_what_a_cut_schedule_cannot_carry_is_refused_before_any_work(base, refiner, tmp_path):
    """Beside a refiner or denoising_start/end each side runs plain txt2img or img2img: the hires pass, a mask and
    ControlNets (but on a txt2img base part that stops at denoising_end) are refused naming the field, before the
    base runs (no U-Net call)."""
    from PIL import Image

    from ldm.control import ControlUnit
    from ldm.inpainting import Inpaint

    _, pipe = base
    _, refiner_pipe = refiner
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    image = Image.new("RGB", (64, 64), (120, 90, 60))
    mask = Inpaint(mask=Image.new("L", (64, 64), 255), mask_blur=0)
    cases = [
        (dict(init_image=image, mask=mask, strength=0.8), dict(refiner=refiner_pipe), "inpaint: inpainting beside a refiner"),
        (dict(init_image=image, mask=mask, strength=0.8), dict(sdxl=SdxlOptions(denoising_end=0.8), output_type="latent"), "inpaint: inpainting"),
        (dict(control=ControlUnit(tmp_path / "any", image)), dict(refiner=refiner_pipe), "control: ControlNets beside a refiner"),
        (dict(control=ControlUnit(tmp_path / "any", image)), dict(sdxl=SdxlOptions(denoising_start=0.5)), "control: ControlNets"),
        (dict(control=ControlUnit(tmp_path / "any", image), init_image=image), dict(sdxl=SdxlOptions(denoising_end=0.8)), "control:"),
        (dict(hires_scale=2.0), dict(refiner=refiner_pipe), "hires_scale: the hires fix beside a refiner"),
    ]  # fmt: skip
    try:
        for what, cut, message in cases:
            with pytest.raises(SettingError, match=re.escape(message)) as raised:
                pipe("a cat", num_inference_steps=2, seed=1, **what, **cut, height=64, width=64)
            assert "\n" not in str(raised.value)
    finally:
        handle.remove()
    assert calls == []
