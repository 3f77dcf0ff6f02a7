"""`ldm txt2img`: files, seeds, metadata, img2img, and every error path (one line, exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_diffusers_folder

import ldm.loading
from ldm.cli import main
from ldm.images import read_parameters
from ldm.pipeline import Pipeline

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-sd1", "sd1")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["txt2img", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_images_get_numbered_names_seeds_and_parameters(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(
        capsys, "a red (cat:1.2)", "--negative-prompt", "blurry, dark", "--model", model, "--seed", 5,
        "--num-images", 3, "--batch-size", 2, "--out", out, *FAST,
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-5.png", "00001-6.png", "00002-7.png"]
    assert stdout.split() == [str(out / name) for name in names]
    params = read_parameters(out / "00001-6.png")
    assert (params.prompt, params.negative_prompt, params.seed, params.steps) == ("a red (cat:1.2)", "blurry, dark", 6, 2)
    assert (params.sampler, params.cfg_scale, params.width, params.height, params.model) == ("DPM++ 2M", 7.5, 64, 64, "tiny-sd1")
    assert params.extra["Version"].startswith("ldm ")

    # Image 1 of a batch of 2 equals a single image made with its own seed.
    single = Pipeline.from_pretrained(model)(
        "a red (cat:1.2)", negative_prompt="blurry, dark", seed=6, num_inference_steps=2, height=64, width=64
    ).images[0]
    assert np.abs(np.asarray(Image.open(out / "00001-6.png"), dtype=int) - np.asarray(single, dtype=int)).max() <= 1

    code, _, _ = run(capsys, "another", "--model", model, "--seed", 5, "--out", out, "--scheduler", "euler-ancestral", *FAST)
    assert code == 0
    assert sorted(p.name for p in out.iterdir())[-1] == "00003-5.png"
    assert read_parameters(out / "00003-5.png").sampler == "Euler a"


def test_prompts_from_a_file(model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    code, _, _ = run(capsys, "--from-file", prompts, "--model", model, "--seed", 1, "--out", tmp_path / "out", *FAST)
    assert code == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [read_parameters(p).prompt for p in files] == ["a cat", "a dog"]
    assert [read_parameters(p).seed for p in files] == [1, 1]


def test_img2img_from_the_command_line(model, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 72, 3), dtype=np.uint8)).save(init)
    code, stdout, _ = run(
        capsys, "a cat", "--init-image", init, "--strength", 0.5, "--model", model, "--seed", 3,
        "--steps", 2, "--clip-skip", 1, "--out", tmp_path / "out", "--quiet",
    )
    assert code == 0
    path = Path(stdout.strip())
    params = read_parameters(path)
    assert Image.open(path).size == (72, 48) and (params.width, params.height) == (72, 48)
    assert params.extra["Denoising strength"] == "0.5" and params.extra["Clip skip"] == "2"


def test_lora_option_changes_the_image_and_is_recorded(model, tmp_path, capsys):
    from test_pipeline import write_lora

    lora = write_lora(Pipeline.from_pretrained(model), tmp_path / "style.safetensors")
    out = tmp_path / "out"
    assert run(capsys, "a cat", "--model", model, "--seed", 4, "--out", out, *FAST)[0] == 0
    assert run(capsys, "a cat", "--model", model, "--seed", 4, "--lora", f"{lora}:0.8", "--out", out, *FAST)[0] == 0
    plain, adapted = sorted(out.iterdir())
    assert np.abs(np.asarray(Image.open(plain), dtype=int) - np.asarray(Image.open(adapted), dtype=int)).max() > 2
    assert read_parameters(adapted).extra["Lora"] == "style: 0.8"
    assert "Lora" not in read_parameters(plain).extra


def broken_image(tmp_path: Path) -> Path:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    return path


def good_image(tmp_path: Path) -> Path:
    path = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(path)
    return path


ERROR_CASES = {
    "width not a multiple of 8": (["a cat", "--width", "65"], "--width must be a positive multiple of 8"),
    "height not a multiple of 8": (["a cat", "--height", "100"], "--height must be a positive multiple of 8"),
    "unknown scheduler": (["a cat", "--scheduler", "plms"], "unknown --scheduler 'plms'"),
    "missing model": (["a cat", "--model", "{tmp}/nothing"], "does not exist"),
    "folder that is not a model": (["a cat", "--model", "{tmp}"], "not a diffusers model"),
    "missing init image": (["a cat", "--init-image", "{tmp}/none.png"], "does not exist"),
    "unreadable init image": (["a cat", "--init-image", "{broken}"], "cannot read image"),
    "strength zero": (["a cat", "--init-image", "{good}", "--strength", "0"], "--strength must be in (0, 1]"),
    "strength above one": (["a cat", "--init-image", "{good}", "--strength", "1.5"], "--strength must be in (0, 1]"),
    "strength without init image": (["a cat", "--strength", "0.5"], "only applies with --init-image"),
    "no prompt": ([], "give either a PROMPT or --from-file"),
    "prompt and file": (["a cat", "--from-file", "{good}"], "give either a PROMPT or --from-file"),
    "missing prompt file": (["--from-file", "{tmp}/none.txt"], "cannot read prompts"),
    "empty prompt file": (["--from-file", "{empty}"], "has no prompts"),
    "zero steps": (["a cat", "--steps", "0"], "--steps must be from 1 to 1000"),
    "zero images": (["a cat", "--num-images", "0"], "--num-images must be at least 1"),
    "zero batch": (["a cat", "--batch-size", "0"], "--batch-size must be at least 1"),
    "negative seed": (["a cat", "--seed", "-3"], "--seed must be -1 (random) or from 0 to"),
    "seed past the range": (["a cat", "--seed", str(2**64 - 1), "--num-images", "2"], "--seed must be -1 (random) or from 0 to"),
    "fp16 on the cpu": (["a cat", "--dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    "unknown device": (["a cat", "--device", "toaster"], "--device"),
    "cuda without a gpu": (["a cat", "--device", "cuda"], "no CUDA device"),
    "offload on the cpu": (["a cat", "--cpu-offload", "--device", "cpu"], "--cpu-offload"),
    "missing lora": (["a cat", "--lora", "{tmp}/none.safetensors:0.5"], "LoRA file"),
    "guidance rescale out of range": (["a cat", "--guidance-rescale", "2"], "--guidance-rescale"),
    "eta for a scheduler without it": (["a cat", "--scheduler", "euler", "--eta", "0.5"], "eta"),
    "spacing for lcm": (
        ["a cat", "--scheduler", "lcm", "--timestep-spacing", "trailing"], "--timestep-spacing does not apply to --scheduler lcm"
    ),
    "bad number": (["a cat", "--steps", "many"], "invalid int value"),
    "unknown dtype": (["a cat", "--dtype", "fp8"], "invalid choice"),
    # Non-finite and out-of-range numbers (issue 23 §4), refused before anything loads.
    "guidance nan": (["a cat", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    "guidance inf": (["a cat", "--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    "guidance -inf": (["a cat", "--guidance-scale=-inf"], "--guidance-scale must be a finite number"),
    "guidance overflow": (["a cat", "--guidance-scale", "1e999"], "--guidance-scale must be a finite number"),
    "guidance rescale nan": (["a cat", "--guidance-rescale", "nan"], "--guidance-rescale must be a finite number"),
    "eta inf": (["a cat", "--scheduler", "ddim", "--eta", "inf"], "--eta must be a finite number"),
    "eta negative": (["a cat", "--scheduler", "ddim", "--eta", "-0.5"], "--eta must be 0 or more"),
    "strength nan": (["a cat", "--init-image", "{good}", "--strength", "nan"], "--strength must be a finite number"),
    "guidance fraction nan": (["a cat", "--guidance-fraction", "nan"], "--guidance-fraction must be a finite number"),
    "guidance fraction above one": (["a cat", "--guidance-fraction", "2"], "--guidance-fraction must be in [0, 1]"),
    "tome inf": (["a cat", "--tome", "inf"], "--tome must be a finite number"),
    "tome too high": (["a cat", "--tome", "0.9"], "--tome must be in [0, 0.75]"),
    "deepcache zero": (["a cat", "--deepcache", "0"], "--deepcache must be at least 1"),
    "clip skip negative": (["a cat", "--clip-skip", "-1"], "--clip-skip must be 0 or more"),
    # Oversized work (issue 22 §4).
    "too many steps": (["a cat", "--steps", "100000"], "--steps must be from 1 to 1000"),
    "huge size": (["a cat", "--width", "100000", "--height", "100000"], "pixels per batch is over --max-pixels"),
    "huge batch": (["a cat", "--num-images", "100000", "--batch-size", "100000"], "64x64 x 100000 images"),
    "max pixels zero": (["a cat", "--max-pixels", "0"], "--max-pixels must be a positive number"),
    "init image sets too big a size": (["a cat", "--init-image", "{good}", "--max-pixels", "4000"], "64x64 x 1 images"),
    "decompression bomb": (["a cat", "--init-image", "{bomb}"], "too many to decode safely"),
    "init image too small": (["a cat", "--init-image", "{tiny}"], "tiny.png of 4x4 is too small; it needs at least 8x8 pixels"),
    "init image is a folder": (["a cat", "--init-image", "{tmp}"], "cannot read image"),
    # Output paths, checked before the generation instead of after it (issue 22 §3).
    "out is a file": (["a cat", "--out", "{good}"], "is a file, not a folder"),
    "out inside a file": (["a cat", "--out", "{good}/images"], "is a file, not a folder"),
    # Text that the tokenizer cannot take or weights that end in NaN (issue 22 §4).
    "prompt with an undecodable byte": (["a \udcff cat"], "PROMPT is not valid UTF-8 text"),
    "negative prompt with an undecodable byte": (["a cat", "--negative-prompt", "\udcfe"], "--negative-prompt is not valid UTF-8"),
    "prompt file with an undecodable byte": (["--from-file", "{latin1}"], "latin1.txt line 2 is not valid UTF-8 (byte 0xe9"),
    "prompt file is a folder": (["--from-file", "{tmp}"], "cannot read prompts"),
    "prompt weight overflows": (["a (cat:1" + "0" * 400 + ")"], "PROMPT: the weight of 'cat' comes to inf"),
    "prompt nested 10000 deep": (["(" * 10_000 + "cat"], "PROMPT: brackets nest more than 32 deep"),
    "prompt file weight": (["--from-file", "{weighted}"], "weighted.txt line 1: the weight of 'cat' comes to inf"),
    # SDXL micro-conditioning (issue 20): pairs in diffusers' order; on an SD model a one-line error naming the flag.
    "sdxl size not a pair": (["a cat", "--original-size", "1024x1024"], "--original-size takes two integers HEIGHT,WIDTH"),
    "sdxl crop negative": (["a cat", "--crops-coords-top-left=-8,0"], "--crops-coords-top-left must be 0 or more"),
    "sdxl option on an sd model": (["a cat", "--negative-target-size", "64,64"], "--negative-target-size is for SDXL models"),
}
# Errors that only the model can reveal; every other case is refused before anything is loaded.
AFTER_LOADING = {"folder that is not a model", "sdxl option on an sd model"}


def bad_input_files(tmp_path: Path) -> dict[str, Path]:
    from test_txt2img_images import png_claiming_size

    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("a cat\nun caf\u00e9\n".encode("latin-1"))
    (tmp_path / "weighted.txt").write_text("(cat:1" + "0" * 400 + ")\n", encoding="utf-8")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    return {
        "tmp": tmp_path, "broken": broken_image(tmp_path), "good": good_image(tmp_path), "empty": tmp_path / "empty.txt",
        "latin1": tmp_path / "latin1.txt", "weighted": tmp_path / "weighted.txt", "tiny": tmp_path / "tiny.png",
        "bomb": png_claiming_size(tmp_path / "bomb.png", 20_000, 20_000),
    }


def bad_input_argv(case: str, names: dict[str, Path], model: Path) -> list[str]:
    argv = [arg.format(**names) if "{" in arg else arg for arg in ERROR_CASES[case][0]]
    if "--model" not in argv:
        argv += ["--model", str(model)]
    if "--out" not in argv:
        argv += ["--out", str(names["tmp"] / "out")]
    sized = any(flag in argv for flag in ("--width", "--height", "--init-image"))
    return ["txt2img", "--steps", "2", "--quiet", *([] if sized else ["--width", "64", "--height", "64"]), *argv]


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_with_exit_code_2(case, model, tmp_path, capsys, monkeypatch):
    if case not in AFTER_LOADING:
        monkeypatch.setattr(Pipeline, "from_pretrained", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    argv = bad_input_argv(case, bad_input_files(tmp_path), model)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert ERROR_CASES[case][1] in err
    assert err.count("\n") == 1 and err.startswith("ldm txt2img: error:")
    assert not (tmp_path / "out").exists()


# Checked in a fresh interpreter: one line on stderr, exit code 2, no traceback, torch never imported.
SUBPROCESS_CASES = [
    "width not a multiple of 8", "guidance nan", "too many steps", "huge batch", "negative seed", "out is a file",
    "decompression bomb", "prompt weight overflows", "prompt file with an undecodable byte", "eta inf",
]
CHECK_WITHOUT_TORCH = """
import sys
from ldm.cli import main
code = main(sys.argv[1:])
assert 'torch' not in sys.modules, 'torch was imported'
sys.exit(code)
"""


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_arguments_fail_fast_without_torch_or_traceback(case, model, tmp_path):
    argv = bad_input_argv(case, bad_input_files(tmp_path), model)
    done = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_TORCH, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.count("\n") == 1 and ERROR_CASES[case][1] in done.stderr


def test_undecodable_command_line_bytes_are_one_line_from_python_m_ldm(tmp_path):
    for argv in ([b"a \xff cat"], [b"a cat", b"--negative-prompt", b"\xfe\xff"]):
        done = subprocess.run(
            [sys.executable, "-m", "ldm", "txt2img", *argv, "--out", str(tmp_path / "out")],
            capture_output=True, cwd=ROOT, timeout=60,
        )
        assert done.returncode == 2 and b"Traceback" not in done.stderr
        assert done.stderr.count(b"\n") == 1 and b"is not valid UTF-8 text" in done.stderr


def test_version():
    from ldm import __version__

    done = subprocess.run([sys.executable, "-m", "ldm", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"ldm {__version__}\n")


def test_seed_minus_one_draws_a_seed_and_records_it(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "a cat", "--seed", "-1", "--num-images", 2, "--model", model, "--out", out, *FAST)
    assert code == 0
    paths = [Path(line) for line in stdout.split()]
    seeds = [read_parameters(path).seed for path in paths]
    assert seeds[1] == seeds[0] + 1 and 0 <= seeds[0] < 2**32
    assert [path.name for path in paths] == [f"00000-{seeds[0]}.png", f"00001-{seeds[1]}.png"]


def test_max_pixels_for_the_models_own_size_is_checked_before_loading(model, tmp_path, capsys, monkeypatch):
    """Without --width/--height the size is the model's: read from its configuration, not its weights."""
    import ldm.pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ldm.pipeline.Pipeline, "from_pretrained", no_loading)
    code, _, err = run(capsys, "a cat", "--model", model, "--max-pixels", 4000, "--steps", 1, "--out", tmp_path, "--quiet")
    assert code == 2 and "64x64 x 1 images = 4096 pixels per batch is over --max-pixels = 4000" in err
    code, _, err = run(capsys, "a cat", "--model", model, "--width", "128", "--max-pixels", 8000, "--out", tmp_path)
    assert code == 2 and "128x64 x 1 images" in err
    monkeypatch.undo()
    code, _, _ = run(capsys, "a cat", "--model", model, "--max-pixels", 4096, "--steps", 1, "--out", tmp_path, "--quiet")
    assert code == 0


def test_the_native_size_is_read_where_the_configuration_says_it(tmp_path):
    from safetensors.torch import save_file

    from ldm.loading.configs import native_side_estimate

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    assert native_side_estimate(tmp_path / "bare.safetensors") is None  # detection needs the tensors
    assert native_side_estimate(ldm.loading.DEFAULT_MODEL_DIR) == 64
    converted = tmp_path / "shapes.safetensors"  # carries its configuration: not SD's
    assert main(["convert", str(ldm.loading.DEFAULT_MODEL_DIR), str(converted)]) == 0
    assert native_side_estimate(converted) == 64


def test_token_merging_bound_is_the_models():
    from ldm.checks import MAX_TOKEN_MERGING
    from ldm.speedups.tome import MAX_RATIO

    assert MAX_TOKEN_MERGING == MAX_RATIO


def test_missing_default_model_says_to_pass_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ldm.loading, "DEFAULT_MODEL_DIR", tmp_path / "not-installed")
    code, _, err = run(capsys, "a cat", "--out", tmp_path / "out", *FAST)
    assert code == 2
    assert "pass --model" in err and err.count("\n") == 1


def test_lcm_sampling_from_the_command_line(model, tmp_path, capsys):
    code, stdout, _ = run(
        capsys, "a red cat", "--model", model, "--scheduler", "lcm", "--guidance-scale", "1", "--seed", 4,
        "--out", tmp_path, "--steps", "4", "--width", "64", "--height", "64", "--quiet",
    )
    assert code == 0
    params = read_parameters(Path(stdout.split()[0]))
    assert (params.sampler, params.steps, params.cfg_scale, params.seed) == ("LCM", 4, 1.0, 4)


def test_every_registered_scheduler_has_a_metadata_name():
    from ldm.schedulers import SCHEDULERS
    from ldm.settings import SAMPLER_NAMES

    assert set(SAMPLER_NAMES) == set(SCHEDULERS)


def test_a_single_call_run_releases_the_weights_and_writes_the_same_image(model, tmp_path, capsys, monkeypatch):
    released: list[Pipeline] = []
    original = Pipeline.generate

    def spy(pipe: Pipeline, *args, **kwargs):
        if pipe.setup.weights_after_use == "release":
            released.append(pipe)
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "generate", spy)
    code, _, _ = run(capsys, "a red cat", "--model", model, "--seed", 7, "--out", tmp_path, *FAST)
    assert code == 0 and len(released) == 1
    assert next(released[0].unet.parameters()).is_meta  # the U-Net's weights are gone after the run
    kept = Pipeline.from_pretrained(model)("a red cat", seed=7, num_inference_steps=2, height=64, width=64).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "00000-7.png")), np.asarray(kept))
    # Two images in batches of one take two calls: nothing is released.
    code, _, _ = run(capsys, "a cat", "--num-images", 2, "--model", model, "--out", tmp_path / "two", *FAST)
    assert code == 0 and len(released) == 1 and len(list((tmp_path / "two").iterdir())) == 2


def test_the_models_recommended_steps_and_guidance_are_the_defaults(model, tmp_path, capsys):
    """generation_config.json in a model folder sets what a run uses when it does not say; flags still win."""
    import shutil

    recommending = tmp_path / "recommending"
    shutil.copytree(model, recommending)
    (recommending / "generation_config.json").write_text('{"guidance_scale": 3.0, "num_inference_steps": 3}')
    pipe = Pipeline.from_pretrained(recommending)
    assert (pipe.defaults.guidance_scale, pipe.defaults.num_inference_steps) == (3.0, 3)
    seen = []
    default = pipe("a cat", seed=1, height=64, width=64, callback=lambda i, t, x, x0: seen.append(i), output_type="np").images
    explicit = pipe("a cat", seed=1, height=64, width=64, num_inference_steps=3, guidance_scale=3.0, output_type="np").images
    assert seen == [0, 1, 2] and np.array_equal(default, explicit)
    assert Pipeline.from_pretrained(model).defaults.guidance_scale == 7.5  # no file: SD's defaults

    out = tmp_path / "out"
    assert run(capsys, "a cat", "--model", recommending, "--seed", 1, "--width", "64", "--height", "64", "--quiet",
               "--out", out)[0] == 0
    params = read_parameters(out / "00000-1.png")
    assert (params.cfg_scale, params.steps) == (3.0, 3)
    assert run(capsys, "a cat", "--model", recommending, "--seed", 1, "--guidance-scale", 5, "--steps", 2, "--width", "64",
               "--height", "64", "--quiet", "--out", out)[0] == 0
    params = read_parameters(out / "00001-1.png")
    assert (params.cfg_scale, params.steps) == (5.0, 2)

    (recommending / "generation_config.json").write_text('{"guidance": 3.0}')
    code, _, err = run(capsys, "a cat", "--model", recommending, "--out", out, "--quiet")
    assert code == 2 and "generation_config.json" in err and "guidance_scale" in err and len(err.strip().splitlines()) == 1


def test_preview_file_is_rewritten_each_step_and_never_replaces_another_file(model, tmp_path, capsys, monkeypatch):
    from ldm import previews

    written = []
    original = previews.write_preview
    monkeypatch.setattr(previews, "write_preview", lambda image, path: (written.append(image.size), original(image, path)))
    preview = tmp_path / "preview.png"
    assert run(capsys, "a cat", "--model", model, "--seed", 1, "--out", tmp_path / "out", "--preview", preview, *FAST)[0] == 0
    assert written == [(8, 8), (8, 8)]  # one per step, 1/8 of the 64x64 image
    with Image.open(preview) as image:
        assert image.info["ldm-preview"] == "1"
    assert run(capsys, "a cat", "--model", model, "--out", tmp_path / "out", "--preview", preview, *FAST)[0] == 0  # a preview again
    other = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(other)
    code, _, err = run(capsys, "a cat", "--model", model, "--out", tmp_path / "out", "--preview", other, *FAST)
    assert code == 2 and "exists and is not an ldm preview" in err
    assert Image.open(other).size == (4, 4)


def test_latent_preview_maps_sd_latents_to_colour():
    import torch

    from ldm.previews import SD_LATENT_RGB_FACTORS, latent_preview

    latents = torch.zeros(2, 4, 3, 5)
    latents[1, 3] = 1.0  # channel 3 alone: its factors, shifted from [-1, 1] to [0, 1]
    gray, coloured = latent_preview(latents)
    assert gray.size == (5, 3) and set(gray.getdata()) == {(128, 128, 128)}
    expected = tuple(round((f + 1) / 2 * 255) for f in SD_LATENT_RGB_FACTORS[3])
    assert all(abs(a - b) <= 1 for a, b in zip(coloured.getpixel((0, 0)), expected))
