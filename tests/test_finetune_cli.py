"""`ldm finetune`: argument errors before loading, full and LoRA runs whose results txt2img loads."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_training_support import colour_folder, one_torch_thread, save_micro_model  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.cli import main
from ldm.training.config import TrainConfig

COLOURS = {"zqx": (230, 20, 20), "a photo of a dog": (20, 20, 230)}


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    return save_micro_model(tmp_path_factory.mktemp("micro") / "model")


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("data"), COLOURS, per_caption=2)


def finetune(*extra: str, model, data, output, resolution: str | None = "32") -> int:
    size = [] if resolution is None else ["--resolution", resolution]
    return main(["finetune", "--model", str(model), "--data", str(data), "--output", str(output), *size, "--no-progress", *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resolution", "500"], "--resolution must be a positive multiple of 8 (e.g. 512), got 500"),
        (["--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
        (["--mixed-precision", "fp16"], "needs a CUDA GPU"),
        (["--cache-latents", "--crop", "random"], "--cache-latents needs a fixed crop"),
        (["--sample-every", "10"], "needs at least one --sample-prompt"),
        (["--cache-text-embeddings", "--train-text-encoder"], "needs a frozen text encoder"),
        (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
        (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
        (["--resume", "latest"], "holds no checkpoint"),
        # Sample settings: found when the first sample rendered, they ended a run after a lost step.
        (["--sample-steps", "5000"], "--sample-steps must be from 1 to 1000, got 5000"),
        (["--sample-prompt", "a {red} (cat:1" + "0" * 400 + ")"], "--sample-prompt: the weight of 'cat' comes to inf"),
    ],
)
def test_bad_settings_fail_before_the_model_is_loaded(extra, message, data_folder, tmp_path, capsys):
    if "fp16" in extra and torch.cuda.is_available():
        pytest.skip("CUDA machines accept fp16")
    # The model path does not exist: an error about it would mean the settings were checked too late.
    assert finetune(*extra, model=tmp_path / "no-model", data=data_folder, output=tmp_path / "out") == 2
    assert message in error_line(capsys)


# (flag, a finite value out of its range, other flags it needs)
FLOAT_FLAGS = [
    ("--caption-dropout", "1.5", []),
    ("--learning-rate", "0", []),
    ("--text-encoder-learning-rate", "-1e-5", []),
    ("--adam-beta1", "1", []),
    ("--adam-beta2", "-0.1", []),
    ("--weight-decay", "-0.01", []),
    ("--adam-epsilon", "0", []),
    ("--max-grad-norm", "-1", []),
    ("--min-snr-gamma", "0", []),
    ("--noise-offset", "-0.05", []),
    ("--ema-decay", "1", []),
    ("--lora-alpha", "0", ["--lora-rank", "2"]),
]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "out of range"])
@pytest.mark.parametrize(("option", "out_of_range", "extra"), FLOAT_FLAGS)
def test_every_float_option_is_finite_and_in_range(option, out_of_range, extra, bad, data_folder, tmp_path, capsys):
    value = out_of_range if bad == "out of range" else bad
    # --flag=value: argparse would take a separate "-inf" for an option.
    code = finetune(f"{option}={value}", *extra, model=tmp_path / "no-model", data=data_folder, output=tmp_path / "out")
    assert code == 2
    line = error_line(capsys)
    assert f"ldm finetune: error: {option} must be a finite number" in line, line
    assert "_" not in line.split("error: ")[1].split(" must")[0]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_sample_guidance_scale_takes_what_guidance_scale_takes(bad, data_folder, tmp_path, capsys):
    """Any finite scale, as ldm txt2img's --guidance-scale (<= 1 turns guidance off); nothing else."""
    code = finetune(f"--sample-guidance-scale={bad}", model=tmp_path / "no-model", data=data_folder, output=tmp_path / "out")
    assert code == 2 and "--sample-guidance-scale must be a finite number" in error_line(capsys)
    TrainConfig(sample_guidance_scale=-1.0)  # accepted


def test_bad_data_fails_before_the_model_is_loaded(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert finetune(model=tmp_path / "no-model", data=empty, output=tmp_path / "out") == 2
    assert "holds no images" in error_line(capsys)
    Image.new("RGB", (32, 32)).save(empty / "a.png")
    assert finetune(model=tmp_path / "no-model", data=empty, output=tmp_path / "out") == 2
    assert "have no caption (e.g. a.png)" in error_line(capsys)


def test_skipped_images_are_one_plain_warning_line_and_bad_captions_one_error_line(data_folder, tmp_path, capsys):
    data = shutil.copytree(data_folder, tmp_path / "data")
    (data / "broken.png").write_bytes(b"not an image")
    (data / "broken.txt").write_text("zqx")
    assert finetune(model=tmp_path / "no-model", data=data, output=tmp_path / "out") == 2  # stops at the model
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning == "ldm finetune: warning: skipped 1 of 5 images: 1 unreadable or truncated (e.g. broken.png)"
    assert "no-model does not exist" in error
    (data / "broken.png").unlink()
    (data / "0-0.txt").write_bytes(b"zqx \xc3(")
    assert finetune(model=tmp_path / "no-model", data=data, output=tmp_path / "out") == 2
    line = error_line(capsys)
    assert line.startswith("ldm finetune: error: ") and line.endswith("0-0.txt line 1 is not valid UTF-8 (byte 0xc3); save it as UTF-8")


def test_defaults_are_the_models_native_size_and_its_sampling_settings(micro_folder, data_folder, tmp_path, capsys):
    import numpy as np

    from ldm.pipeline import Pipeline

    model = shutil.copytree(micro_folder, tmp_path / "model")
    (model / "generation_config.json").write_text(json.dumps({"guidance_scale": 2.0, "num_inference_steps": 3}))
    out = tmp_path / "run"
    code = finetune("--max-steps", "1", "--sample-every", "1", "--sample-prompt", "zqx", model=model, data=data_folder,
                    output=out, resolution=None)
    assert code == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err  # 32 px images at the micro model's native 4 latents x 8 = 32 px
    with Image.open(out / "samples" / "step-000001-0.png") as sample:
        rendered = np.asarray(sample.convert("RGB"))
    assert rendered.shape == (32, 32, 3)
    # The weights after step 1 are the result's: the sample is what they give at the model's 3 steps, guidance 2.
    pipe = Pipeline.from_pretrained(out / "model")
    expected = np.asarray(pipe("zqx", num_inference_steps=3, guidance_scale=2.0, width=32, height=32, seed=0).images[0])
    assert np.array_equal(rendered, expected)
    txt2img_default = np.asarray(pipe("zqx", num_inference_steps=20, guidance_scale=7.5, width=32, height=32, seed=0).images[0])
    assert not np.array_equal(rendered, txt2img_default)


def test_images_resized_more_than_twice_are_one_warning_line(data_folder, tmp_path, capsys):
    assert finetune(model=tmp_path / "no-model", data=data_folder, output=tmp_path / "out", resolution="128") == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning == ("ldm finetune: warning: 4 of 4 images are resized by more than 2x to train at 128 px "
                       "(e.g. 0-0.png: 32x32 enlarged 4x); if that is not intended, set --resolution")
    assert "no-model does not exist" in error
    assert finetune(model=tmp_path / "no-model", data=data_folder, output=tmp_path / "out", resolution="64") == 2
    assert "warning" not in capsys.readouterr().err  # exactly 2x is a usual upscale


def test_full_finetune_writes_a_model_txt2img_loads(micro_folder, data_folder, tmp_path, capsys):
    from ldm.loading import load_components
    from ldm.pipeline import Pipeline

    out = tmp_path / "run"
    code = finetune("--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--checkpointing-steps", "1",
                    "--checkpoints-total-limit", "1", "--sample-every", "2", "--sample-prompt", "zqx", "--sample-steps", "2",
                    model=micro_folder, data=data_folder, output=out)
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    before, after = load_components(micro_folder), load_components(out / "model")
    changed = [k for k, v in before.unet.state_dict().items() if not torch.equal(v, after.unet.state_dict()[k])]
    assert changed
    assert all(torch.equal(v, after.vae.state_dict()[k]) for k, v in before.vae.state_dict().items())
    assert all(torch.equal(v, after.text_encoder.state_dict()[k]) for k, v in before.text_encoder.state_dict().items())
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    assert (out / "samples" / "step-000002-0.png").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000002"]
    pipe = Pipeline.from_pretrained(out / "model")
    assert pipe.name == "run"  # named after the run's folder, not "model"
    image = pipe("zqx", num_inference_steps=2, height=32, width=32, seed=0).images[0]
    assert image.size == (32, 32)
    # The run is finished: running it again would overwrite the result.
    assert finetune("--max-steps", "2", model=micro_folder, data=data_folder, output=out) == 2
    assert "already exists" in error_line(capsys)


def test_lora_finetune_writes_a_file_txt2img_applies(micro_folder, data_folder, tmp_path, capsys):
    from ldm.pipeline import Pipeline

    out = tmp_path / "run"
    code = finetune("--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-2", "--lora-rank", "2",
                    "--lora-alpha", "4", "--train-text-encoder", model=micro_folder, data=data_folder, output=out)
    assert code == 0, capsys.readouterr().err
    lora = out / "lora.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_text_model_") for k in keys)

    def render(scale):
        pipe = Pipeline.from_pretrained(micro_folder)
        if scale is not None:
            pipe.load_lora(lora, scale=scale)
        return pipe("zqx", num_inference_steps=2, height=32, width=32, seed=0, output_type="pt").images

    base, zero, full = render(None), render(0.0), render(1.0)
    assert torch.allclose(base, zero, atol=1e-5)
    assert not torch.allclose(base, full, atol=1e-4)
    images = tmp_path / "images"
    assert main(["txt2img", "zqx", "--model", str(micro_folder), "--lora", f"{lora}:0.8", "--steps", "2",
                 "--width", "32", "--height", "32", "--seed", "0", "--out", str(images), "--quiet"]) == 0
    assert len(list(images.glob("*.png"))) == 1


def press_ctrl_c_after_the_first_logged_step(output):
    """From another thread: SIGINT to this process once ``output/log.csv`` has a row (as a terminal's Ctrl-C)."""

    def wait_then_interrupt():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = output / "log.csv"
            if log.exists() and len(log.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=wait_then_interrupt, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume_in_one_line(micro_folder, data_folder, tmp_path, capsys):
    out = tmp_path / "run"
    thread = press_ctrl_c_after_the_first_logged_step(out)
    code = finetune("--max-steps", "2000", "--lora-rank", "2", model=micro_folder, data=data_folder, output=out)
    thread.join()
    assert code == 130
    line = error_line(capsys)
    match = re.fullmatch(r"ldm finetune: interrupted at step (\d+); saved (\S+); continue with the same options and --resume latest", line)
    assert match, line
    step, saved = int(match[1]), Path(match[2])
    assert 1 <= step < 500 and saved == out / "checkpoints" / f"checkpoint-{step:06d}"
    assert json.loads((saved / "state.json").read_text())["step"] == step
    assert not (out / "lora.safetensors").exists()
    assert finetune("--max-steps", str(step + 1), "--lora-rank", "2", "--resume", "latest",
                    model=micro_folder, data=data_folder, output=out) == 0
    assert (out / "lora.safetensors").is_file()


def lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_finished_lora_run_continues_in_its_folder_keeping_the_shorter_result(micro_folder, data_folder, tmp_path, capsys):
    out = tmp_path / "run"
    lora = ["--lora-rank", "2", "--learning-rate", "1e-2", "--batch-size", "2"]
    assert finetune("--max-steps", "2", *lora, model=micro_folder, data=data_folder, output=out) == 0
    first, kept = out / "lora.safetensors", out / "checkpoints" / "checkpoint-000002" / "lora.safetensors"
    assert first.samefile(kept)  # the result lives in the run's last checkpoint, linked beside it
    shorter = first.read_bytes()
    capsys.readouterr()

    assert finetune("--max-steps", "4", *lora, model=micro_folder, data=data_folder, output=out) == 2
    assert "lora.safetensors already exists (the run is finished); continue it with --resume latest" in error_line(capsys)
    assert finetune("--max-steps", "2", "--resume", "latest", *lora, model=micro_folder, data=data_folder, output=out) == 2
    assert "finished at step 2; pass a larger --max-steps" in error_line(capsys)

    # docs/training.md's way: --resume latest with a larger --max-steps, checkpoints every step, keeping 1.
    code = finetune("--max-steps", "4", "--resume", "latest", "--checkpointing-steps", "1", "--checkpoints-total-limit", "1",
                    *lora, model=micro_folder, data=data_folder, output=out)
    assert code == 0, capsys.readouterr().err
    assert f"the shorter run's result is kept in {kept}" in capsys.readouterr().out
    assert kept.read_bytes() == shorter  # not lost, and the limit of 1 did not delete its checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    assert first.samefile(out / "checkpoints" / "checkpoint-000004" / "lora.safetensors")
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    straight = tmp_path / "straight"
    assert finetune("--max-steps", "4", *lora, model=micro_folder, data=data_folder, output=straight) == 0
    expected, got = lora_tensors(straight / "lora.safetensors"), lora_tensors(first)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # docs/training.md's way to get the shorter result out: resume its checkpoint elsewhere at its own --max-steps.
    copy, files = tmp_path / "copy", sorted(kept.parent.iterdir())
    assert finetune("--max-steps", "2", "--resume", str(kept.parent), *lora, model=micro_folder, data=data_folder, output=copy) == 0
    again, original = lora_tensors(copy / "lora.safetensors"), lora_tensors(kept)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)
    assert sorted(kept.parent.iterdir()) == files  # the other folder's checkpoint is only read
    # An older checkpoint of the run itself would have to overwrite the newer one at its step.
    assert finetune("--max-steps", "6", "--resume", str(kept.parent), *lora, model=micro_folder, data=data_folder, output=out) == 2
    assert "--resume checkpoint-000002 is older than checkpoint-000004" in error_line(capsys)

    other = tmp_path / "other"
    assert finetune("--max-steps", "1", *lora, model=micro_folder, data=data_folder, output=other) == 0
    capsys.readouterr()
    foreign = other / "checkpoints" / "checkpoint-000001"
    assert finetune("--max-steps", "6", "--resume", str(foreign), *lora, model=micro_folder, data=data_folder, output=out) == 2
    assert "is not a checkpoint of its run; choose another --output" in error_line(capsys)
    # A result that no checkpoint keeps (as an older ldm wrote them) is never replaced.
    first.unlink()
    first.write_bytes(shorter)
    assert finetune("--max-steps", "6", "--resume", "latest", *lora, model=micro_folder, data=data_folder, output=out) == 2
    assert "lora.safetensors is kept in no checkpoint" in error_line(capsys)
    assert first.read_bytes() == shorter


def test_a_finished_full_run_continues_and_replaces_its_model_folder(micro_folder, data_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune("--max-steps", "1", model=micro_folder, data=data_folder, output=out) == 0
    shorter = (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert finetune("--max-steps", "2", "--resume", "latest", model=micro_folder, data=data_folder, output=out) == 0
    unet = out / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.samefile(out / "checkpoints" / "checkpoint-000002" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.read_bytes() != shorter
    assert (out / "checkpoints" / "checkpoint-000001" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == shorter
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "log.csv", "model"]


def test_settings_are_recorded_in_checkpoints(micro_folder, data_folder, tmp_path):
    out = tmp_path / "run"
    assert finetune("--max-steps", "1", "--checkpointing-steps", "1", "--min-snr-gamma", "5", "--noise-offset", "0.05",
                    "--lr-schedule", "cosine", "--lr-warmup-steps", "1", model=micro_folder, data=data_folder, output=out) == 0
    state = json.loads((out / "checkpoints" / "checkpoint-000001" / "state.json").read_text())
    assert state["settings"]["min_snr_gamma"] == 5.0 and state["settings"]["lr_schedule"] == "cosine"
    assert state["step"] == 1 and state["world_size"] == 1


def test_tensorboard_log_or_a_clear_error_without_it(micro_folder, data_folder, tmp_path, capsys):
    import importlib.util

    out = tmp_path / "run"
    code = finetune("--max-steps", "1", "--log", "tensorboard", model=micro_folder, data=data_folder, output=out)
    if importlib.util.find_spec("tensorboard") is None:
        assert code == 2
        assert "pip install tensorboard" in error_line(capsys)
    else:
        assert code == 0 and list((out / "tensorboard").glob("events.out.tfevents.*"))
