"""Fine-tuning SDXL: the conditioning as diffusers' SDXL pipeline computes it, the micro-conditioning from each
sample's crop, the loss against diffusers' U-Net, LoRA files diffusers reads, bf16 on a CPU, and what is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_sdxl
import torch
from PIL import Image
from safetensors import safe_open
from test_training_support import colour_folder, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.cli import main
from ldm.training import DataConfig, ImageCaptionDataset, TrainConfig, scan_folder, train
from ldm.training.captions import CaptionEncoders, encode_captions
from ldm.training.objective import diffusion_loss

COLOURS = {"zqx": (230, 20, 20), "a photo of a dog": (20, 20, 230)}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return tiny_sdxl.save_folder(tmp_path_factory.mktemp("sdxl") / "base")


@pytest.fixture(scope="module")
def reference(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(folder):
    from ldm.loading import load_components

    return load_components(folder)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("data"), COLOURS, per_caption=2, size=64)


def encoders_of(models) -> CaptionEncoders:
    return CaptionEncoders(models.tokenizer, models.text_encoder, models.tokenizer_2, models.text_encoder_2)


def test_captions_condition_as_diffusers_sdxl_pipeline_encodes_them(sdxl_folder, reference):
    captions = ["a red cube on a table", ""]
    with torch.no_grad():
        text = encode_captions(captions, encoders_of(components(sdxl_folder)), torch.device("cpu"))
        states, _, pooled, _ = reference.encode_prompt(captions, do_classifier_free_guidance=False)
    assert text.context.shape == states.shape and text.pooled.shape == pooled.shape
    torch.testing.assert_close(text.context, states, rtol=0, atol=1e-5)
    torch.testing.assert_close(text.pooled, pooled, rtol=0, atol=1e-5)


def test_time_ids_name_the_source_size_and_the_crop_that_the_pixels_show(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("noise")
    config = DataConfig(resolution=32, buckets=False, crop="random", random_flip=True)
    dataset = ImageCaptionDataset(scan_folder(tmp_path, config), config)
    for position in (0.0, 0.3, 1.0):
        for flip in (False, True):
            height, width, top, left, target_h, target_w = dataset.time_ids(0, flip, position)
            assert (height, width, target_h, target_w) == (48, 80, 32, 32)
            # The crop named: the resized image (32 high, 53 wide), mirrored for a flipped sample, cut at (top, left).
            resized = Image.open(tmp_path / "wide.png").convert("RGB").resize((53, 32), Image.Resampling.LANCZOS)
            if flip:
                resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            expected = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 127.5 - 1.0
            shown = dataset.pixels(0, flip, position).permute(1, 2, 0).numpy()
            np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert dataset.time_ids(0, False, 0.0)[3] == 0 and dataset.time_ids(0, True, 0.0)[3] == 53 - 32


def test_the_loss_equals_diffusers_unet_on_the_same_draws(sdxl_folder, reference):
    from ldm.schedulers import NoiseProcess, SCHEDULERS

    models = components(sdxl_folder)
    with torch.no_grad():
        text = encode_captions(["zqx", "a photo of a dog"], encoders_of(models), torch.device("cpu"))
    time_ids = torch.tensor([[48.0, 80.0, 0.0, 12.0, 32.0, 32.0], [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    scheduler = NoiseProcess.from_config(models.scheduler_config.filled_for(SCHEDULERS["ddpm"].DIFFUSERS_DEFAULTS))

    def theirs(noisy, timesteps, context, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return reference.unet(noisy, timesteps, context, added_cond_kwargs=added).sample

    with torch.no_grad():
        ours, expected = (
            diffusion_loss(unet, scheduler, latents, text.context, torch.Generator().manual_seed(5), added=text.added(time_ids))
            for unet in (models.unet, theirs)
        )
    ours, expected = float(ours), float(expected)
    assert math.isfinite(ours) and abs(ours - expected) <= 1e-5 * abs(expected)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = []
    module.register_forward_pre_hook(lambda _module, args, kwargs: calls.append(len(args[0]) if args else len(kwargs["input_ids"])), with_kwargs=True)
    return calls


def run_lora(models, data_folder, output, **overrides):
    data = DataConfig(resolution=64, caption_dropout=0.0)
    settings = dict(max_steps=3, batch_size=2, learning_rate=1e-2, lora_rank=2, checkpointing_steps=3, seed=3)
    dataset = ImageCaptionDataset(scan_folder(data_folder, data), data, seed=3)
    return train(models, dataset, TrainConfig(**{**settings, **overrides}), output, show_progress=False)


def lora_weights(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unet.named_parameters() if "lora_" in name}


def test_a_resumed_run_equals_the_uninterrupted_one_with_the_caption_cache(sdxl_folder, tmp_path):
    colours = {f"colour {i}": (60 * i, 20, 200 - 40 * i) for i in range(4)}
    folder = colour_folder(tmp_path / "data", colours, per_caption=1, size=64)
    whole = run_lora(components(sdxl_folder), folder, tmp_path / "whole", max_steps=4, batch_size=3, checkpointing_steps=1)
    run_lora(components(sdxl_folder), folder, tmp_path / "parts", max_steps=1, batch_size=3, checkpointing_steps=1)
    data = DataConfig(resolution=64, caption_dropout=0.0)
    config = TrainConfig(max_steps=4, batch_size=3, learning_rate=1e-2, lora_rank=2, checkpointing_steps=1, seed=3)
    resumed = train(components(sdxl_folder), ImageCaptionDataset(scan_folder(folder, data), data, seed=3), config,
                    tmp_path / "parts", resume="latest", show_progress=False)  # fmt: skip
    expected = lora_weights(whole.unet)
    assert all(torch.equal(value, expected[name]) for name, value in lora_weights(resumed.unet).items())


def test_a_lora_run_encodes_each_caption_once_and_checkpointing_changes_nothing(sdxl_folder, data_folder, tmp_path):
    models = components(sdxl_folder)
    frozen = {name: p.clone() for name, p in models.unet.state_dict().items()}
    calls = [count_calls(models.text_encoder), count_calls(models.text_encoder_2)]
    plain = run_lora(models, data_folder, tmp_path / "plain")
    assert [sum(c) for c in calls] == [len(COLOURS), len(COLOURS)]  # 3 steps of 2 images, each caption encoded once
    assert math.isfinite(plain.last_loss)
    trained = lora_weights(plain.unet)
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in trained.items())
    base = {name.replace(".base_layer", ""): value for name, value in plain.unet.state_dict().items() if "lora_" not in name}
    assert base.keys() == frozen.keys() and all(torch.equal(value, base[name]) for name, value in frozen.items())
    checkpointed = run_lora(components(sdxl_folder), data_folder, tmp_path / "ckpt", gradient_checkpointing=True)
    for name, value in lora_weights(checkpointed.unet).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=1e-6)


def reset_accelerate() -> None:
    """accelerate's process-wide state cannot change precision once set (see test_training_loop); reset it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture()
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def test_bf16_on_the_cpu_keeps_fp32_adapters_and_the_first_loss_near_fp32s(sdxl_folder, data_folder, tmp_path, fresh_accelerate_state):
    fp32 = run_lora(components(sdxl_folder), data_folder, tmp_path / "fp32", max_steps=1, checkpointing_steps=None)
    models = components(sdxl_folder)
    reset_accelerate()
    bf16 = run_lora(models, data_folder, tmp_path / "bf16", max_steps=1, checkpointing_steps=None, mixed_precision="bf16",
                    sample_every=1, sample_prompts=("zqx",), sample_steps=2)  # fmt: skip
    # Frozen weights (the U-Net's base included) are stored in bf16, the adapters in fp32.
    assert next(models.text_encoder_2.parameters()).dtype == torch.bfloat16
    assert {p.dtype for name, p in bf16.unet.named_parameters() if "lora_" not in name} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in lora_weights(bf16.unet).values())
    assert Image.open(tmp_path / "bf16" / "samples" / "step-000001-0.png").size == (64, 64)  # samples render in bf16
    # Same draws, same images: bf16's 8-bit mantissa moves the loss by well under 5 %.
    assert abs(bf16.last_loss - fp32.last_loss) <= 0.05 * fp32.last_loss


def test_finetune_writes_an_sdxl_lora_in_kohyas_layout_that_diffusers_applies_as_ldm_does(
    sdxl_folder, reference, data_folder, tmp_path, capsys
):
    from ldm.pipeline import Pipeline

    output = tmp_path / "run"
    code = main([
        "finetune", "--model", str(sdxl_folder), "--data", str(data_folder), "--output", str(output), "--resolution", "64",
        "--lora-rank", "2", "--max-steps", "2", "--learning-rate", "1e-2", "--gradient-checkpointing", "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    path = output / "lora.safetensors"
    with safe_open(path, "pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for k in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_resolution"] == "(64, 64)"

    before = {k: v.clone() for k, v in reference.unet.state_dict().items()}
    reference.load_lora_weights(str(path))
    reference.fuse_lora()
    theirs = {k.replace(".base_layer", ""): v.clone() for k, v in reference.unet.state_dict().items() if "lora_" not in k}
    reference.unfuse_lora()
    reference.unload_lora_weights()
    ours = Pipeline.from_pretrained(sdxl_folder)
    ours.load_lora(path, fuse=True)
    fused = ours.unet.state_dict()
    changed = [k for k in fused if not torch.equal(fused[k], before[k])]
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for k in changed)
    for key in fused:
        torch.testing.assert_close(fused[key], theirs[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train-text-encoder"], "training SDXL's text encoders is not built; drop --train-text-encoder"),
        (["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a CUDA GPU"),
    ],
)
def test_what_sdxl_fine_tuning_refuses_is_one_line(extra, message, sdxl_folder, data_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusals are a CPU's
    code = main(["finetune", "--model", str(sdxl_folder), "--data", str(data_folder), "--output", str(tmp_path / "o"),
                 "--resolution", "64", "--no-progress", *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_refiner_and_emulated_bf16_are_refused(sdxl_folder, tmp_path, data_folder, capsys, monkeypatch):
    refiner = tiny_sdxl.save_folder(tmp_path / "refiner", "refiner")
    args = ["finetune", "--data", str(data_folder), "--output", str(tmp_path / "o"), "--resolution", "64", "--no-progress"]
    assert main([*args, "--model", str(refiner)]) == 2
    assert "is an SDXL refiner; ldm finetune trains SD 1.x/2.x and SDXL base models" in capsys.readouterr().err

    from ldm.kernels import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "this_cpu", lambda: cpu.CPU("Old CPU", ("avx2", "fma")))
    assert main([*args, "--model", str(sdxl_folder), "--mixed-precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "this CPU (Old CPU) has no native bf16" in err and "use --mixed-precision no" in err


def test_a_full_bf16_sdxl_finetune_writes_a_folder_diffusers_loads_and_renders_samples(
    sdxl_folder, data_folder, tmp_path, capsys, monkeypatch, fresh_accelerate_state
):
    from diffusers import StableDiffusionXLPipeline

    from ldm.kernels import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "this_cpu", lambda: cpu.CPU("A CPU with bf16", ("avx512_bf16", "avx512f")))
    output = tmp_path / "run"
    code = main([
        "finetune", "--model", str(sdxl_folder), "--data", str(data_folder), "--output", str(output), "--resolution", "64",
        "--max-steps", "1", "--learning-rate", "1e-3", "--sample-every", "1", "--sample-prompt", "zqx", "--sample-steps", "2",
        "--mixed-precision", "bf16", "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert Image.open(output / "samples" / "step-000001-0.png").size == (64, 64)
    loaded = StableDiffusionXLPipeline.from_pretrained(output / "model")
    start = components(sdxl_folder)
    trained = components(output / "model")
    for name, value in trained.unet.state_dict().items():
        assert torch.equal(value, loaded.unet.state_dict()[name]), name
    assert any(not torch.equal(value, start.unet.state_dict()[name]) for name, value in trained.unet.state_dict().items())
    for part in ("text_encoder", "text_encoder_2", "vae"):  # frozen (run in bf16): written back exactly as they were
        before, after = getattr(start, part).state_dict(), getattr(trained, part).state_dict()
        assert all(torch.equal(value, after[name]) for name, value in before.items()), part


def test_a_bf16_lora_run_reads_the_model_in_bf16_and_writes_fp32_adapters(
    sdxl_folder, data_folder, tmp_path, capsys, monkeypatch, fresh_accelerate_state
):
    from ldm.cli import finetune
    from ldm.kernels import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "this_cpu", lambda: cpu.CPU("A CPU with bf16", ("avx512_bf16", "avx512f")))
    assert finetune.load_dtype(TrainConfig(lora_rank=2, mixed_precision="bf16")) == torch.bfloat16
    assert finetune.load_dtype(TrainConfig(mixed_precision="bf16")) == torch.float32  # a whole U-Net trains in fp32
    code = main(["finetune", "--model", str(sdxl_folder), "--data", str(data_folder), "--output", str(tmp_path / "run"),
                 "--resolution", "64", "--lora-rank", "2", "--max-steps", "1", "--mixed-precision", "bf16", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with safe_open(tmp_path / "run" / "lora.safetensors", "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(key.endswith("lora_up.weight") and t.abs().sum() > 0 for key, t in tensors.items())
