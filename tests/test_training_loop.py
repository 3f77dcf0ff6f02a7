"""The training loop: objective maths, schedule, EMA, reproducibility, exact resume, caches, checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import warnings

import pytest
import torch
from test_training_support import colour_folder, micro_models, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.errors import CheckpointError, ConfigError
from ldm.schedulers import SchedulerConfig, create
from ldm.training import DataConfig, ImageCaptionDataset, TrainConfig, scan_folder, train
from ldm.training.checkpoint import list_checkpoints, load_checkpoint, resolve_resume
from ldm.training.ema import EMA
from ldm.training.interrupt import TrainingInterrupted
from ldm.training.loop import lr_factor
from ldm.training.objective import min_snr_weights, sample_noise, snr

COLOURS = {"zqx": (230, 20, 20), "a photo of a dog": (20, 20, 230), "grass": (20, 200, 20)}


def test_snr_and_min_snr_weights_match_the_closed_form():
    scheduler = create("ddpm", SchedulerConfig())
    t = torch.tensor([0, 10, 100, 500, 999])
    abar = scheduler.alphas_cumprod[t].double()
    expected = abar / (1 - abar)
    assert torch.allclose(snr(scheduler, t), expected, rtol=1e-6)
    values = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
    assert torch.allclose(min_snr_weights(values, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64))
    assert torch.allclose(min_snr_weights(values, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51], dtype=torch.float64))
    assert torch.allclose(min_snr_weights(values, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0], dtype=torch.float64))


def test_noise_offset_adds_a_per_channel_constant():
    shape = (64, 4, 16, 16)
    plain = sample_noise(shape, torch.Generator().manual_seed(0), "cpu", torch.float32, 0.0)
    offset = sample_noise(shape, torch.Generator().manual_seed(0), "cpu", torch.float32, 0.5)
    # Channel means of plain noise have std 1/16; the offset adds N(0, 0.5^2) to each.
    assert plain.mean(dim=(2, 3)).std() < 0.1
    assert 0.4 < offset.mean(dim=(2, 3)).std() < 0.6
    assert torch.allclose((offset - plain).std(dim=(2, 3)), torch.zeros(64, 4), atol=1e-5)


def test_learning_rate_warm_up_and_schedules():
    cosine = lr_factor(TrainConfig(max_steps=109, lr_warmup_steps=9, lr_schedule="cosine"))
    assert [round(cosine(s), 3) for s in (0, 4, 8)] == [0.1, 0.5, 0.9]
    assert cosine(9) == 1.0 and abs(cosine(59) - 0.5) < 1e-9 and cosine(109) < 1e-9
    linear = lr_factor(TrainConfig(max_steps=100, lr_schedule="linear"))
    assert linear(0) == 1.0 and abs(linear(50) - 0.5) < 1e-9
    assert lr_factor(TrainConfig(max_steps=10))(9) == 1.0


def test_ema_averages_with_warm_up():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.9, 1/10) = 0.1
    assert math.isclose(float(ema.shadow["weight"]), 0.9, rel_tol=1e-6)
    ema.update(model)  # decay min(0.9, 2/11)
    assert math.isclose(float(ema.shadow["weight"]), 1 - 0.1 * 2 / 11, rel_tol=1e-6)
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    target = torch.nn.Linear(1, 1, bias=False)
    restored.copy_to(target)
    assert restored.updates == 2 and float(target.weight.detach()) == float(ema.shadow["weight"])


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    folder = colour_folder(tmp_path_factory.mktemp("data"), COLOURS, per_caption=2)
    config = DataConfig(resolution=32, crop="random", random_flip=True, caption_dropout=0.2)
    return folder, config


def dataset_for(folder, config, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ImageCaptionDataset(scan_folder(folder, config), config, seed=seed)


# Every feature that touches randomness or state at once: accumulation, EMA, Min-SNR, noise offset,
# warm-up, random crops, flips and caption dropout.
BUSY = dict(batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, ema_decay=0.9, min_snr_gamma=5.0,
            noise_offset=0.1, lr_warmup_steps=2, checkpointing_steps=2)


def run(tmp_path, name, data, steps, resume=None, models=None, **overrides):
    models = models or micro_models()
    config = TrainConfig(max_steps=steps, seed=7, **{**BUSY, **overrides})
    result = train(models, dataset_for(*data, seed=7), config, tmp_path / name, resume=resume, show_progress=False)
    return result, tmp_path / name


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path, colour_data):
    full, _ = run(tmp_path, "full", colour_data, 4)
    # A second run stops after 3 steps (checkpoints at 2 and at its last step), then resumes from 2 to the end.
    _, folder = run(tmp_path, "cut", colour_data, 3)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-000002", "checkpoint-000003"]
    resumed, _ = run(tmp_path, "cut", colour_data, 4, resume=str(folder / "checkpoints" / "checkpoint-000002"))
    assert resumed.step == 4
    for name, value in full.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[name]), name
    start = micro_models().unet.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in full.unet.state_dict().items())


def test_a_format_1_checkpoint_with_positional_optimizer_state_still_resumes_exactly(tmp_path, colour_data):
    full, _ = run(tmp_path, "full", colour_data, 3)
    _, folder = run(tmp_path, "old", colour_data, 2)
    checkpoint = list_checkpoints(folder)[-1]
    # Rewrite it as the format-1 writer did: torch's optimizer.state_dict(), keyed by position.
    named = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    order = [name for group in named["param_groups"] for name in group["params"]]
    positional = {
        "state": {order.index(name): values for name, values in named["state"].items()},
        "param_groups": [{**g, "params": [order.index(n) for n in g["params"]]} for g in named["param_groups"]],
    }
    torch.save(positional, checkpoint / "optimizer.pt")
    meta = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**meta, "format_version": 1}))
    resumed, _ = run(tmp_path, "old", colour_data, 3, resume="latest")
    for name, value in full.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[name]), name
    (checkpoint / "state.json").write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(CheckpointError, match="has checkpoint format 7, this ldm reads"):
        load_checkpoint(checkpoint)


def test_data_loading_workers_give_the_same_run_and_resume_at_the_same_batch(tmp_path, colour_data):
    # Augmentations are drawn per (seed, epoch, image) and batches are read in the sampler's order,
    # so which worker process loads an image must not matter; the data position is counted in the
    # main process, so a resume with workers restarts at the same batch.
    inline, inline_folder = run(tmp_path, "inline", colour_data, 4)
    workers, workers_folder = run(tmp_path, "workers", colour_data, 4, num_workers=2)
    _, cut = run(tmp_path, "cut", colour_data, 3, num_workers=2)
    resumed, _ = run(tmp_path, "cut", colour_data, 4, resume="latest", num_workers=2)
    for name, value in inline.unet.state_dict().items():
        assert torch.equal(value, workers.unet.state_dict()[name]), name
        assert torch.equal(value, resumed.unet.state_dict()[name]), name
    positions = [(s.epoch, s.batch) for s in (load_checkpoint(list_checkpoints(f)[-1]) for f in (inline_folder, workers_folder))]
    assert positions[0] == positions[1] and positions[0] != (0, 0)


def test_a_different_seed_gives_different_weights(tmp_path, colour_data):
    a, _ = run(tmp_path, "a", colour_data, 1)
    models = micro_models()
    config = TrainConfig(max_steps=1, seed=8, **BUSY)
    b = train(models, dataset_for(*colour_data, seed=8), config, tmp_path / "b", show_progress=False)
    assert any(not torch.equal(v, b.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())


def test_checkpoints_keep_the_last_k_and_latest_is_the_newest(tmp_path, colour_data):
    _, folder = run(tmp_path, "k", colour_data, 6, checkpoints_total_limit=2, gradient_accumulation_steps=1, ema_decay=None)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-000004", "checkpoint-000006"]
    (folder / "checkpoints" / ".checkpoint-000008.abc.tmp").mkdir()  # a half-written one from a kill
    assert resolve_resume(folder, "latest").name == "checkpoint-000006"
    state = load_checkpoint(resolve_resume(folder, "latest"))
    assert state.step == 6 and state.world_size == 1 and len(state.rng) == 1
    assert state.ema is None and state.optimizer["state"]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run(tmp_path, "k", colour_data, 6)
    # Resuming a finished run does nothing more and returns the same step.
    done, _ = run(tmp_path, "k", colour_data, 6, resume="latest", checkpoints_total_limit=2,
                  gradient_accumulation_steps=1, ema_decay=None)
    assert done.step == 6 and done.last_loss is None


def test_checkpoints_by_default_at_every_500_steps_and_the_last_keeping_3():
    config = TrainConfig()
    assert (config.checkpointing_steps, config.checkpoints_total_limit) == (500, 3)


def interrupt_at(step: int):
    """A sample hook that presses Ctrl-C (SIGINT to this process) while step ``step`` renders."""

    def sample(request):
        if request.step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return sample


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_the_resume_is_exact(tmp_path, colour_data):
    full, _ = run(tmp_path, "full", colour_data, 5)
    folder = tmp_path / "cut"
    config = TrainConfig(max_steps=1000, seed=7, sample_every=1, sample_prompts=("zqx",), **BUSY)
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    with pytest.raises(TrainingInterrupted) as caught:
        train(micro_models(), dataset_for(*colour_data, seed=7), config, folder, sample_fn=interrupt_at(3), show_progress=False)
    # Step 3 is not a multiple of checkpointing_steps (2): this checkpoint is Ctrl-C's own.
    assert caught.value.step == 3 and caught.value.checkpoint == folder / "checkpoints" / "checkpoint-000003"
    assert isinstance(caught.value, KeyboardInterrupt)
    assert load_checkpoint(caught.value.checkpoint).step == 3
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C means again what it meant before the run
    resumed, _ = run(tmp_path, "cut", colour_data, 5, resume="latest")
    for name, value in full.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[name]), name
    assert resumed.checkpoint == folder / "checkpoints" / "checkpoint-000005"  # the last step's


def test_resume_refuses_changed_settings_and_bad_paths(tmp_path, colour_data):
    _, folder = run(tmp_path, "r", colour_data, 2, gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="cannot resume: batch_size was 2, now 1"):
        run(tmp_path, "r", colour_data, 4, resume="latest", gradient_accumulation_steps=1, batch_size=1)
    with pytest.raises(ConfigError, match="cannot resume: learning_rate was"):
        run(tmp_path, "r", colour_data, 4, resume="latest", gradient_accumulation_steps=1, learning_rate=0.5)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        run(tmp_path, "r", colour_data, 4, resume=str(tmp_path), gradient_accumulation_steps=1)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        run(tmp_path, "empty", colour_data, 4, resume="latest")


def test_a_decaying_learning_rate_schedule_resumes_only_to_the_same_length(tmp_path, colour_data):
    """Cosine's rate at a step depends on max_steps: continued to more steps it is not a run of that many."""
    _, folder = run(tmp_path, "c", colour_data, 2, lr_schedule="cosine", lr_warmup_steps=0)
    with pytest.raises(ConfigError, match="cosine learning-rate schedule was laid out for 2 steps"):
        run(tmp_path, "c", colour_data, 4, resume=str(folder / "checkpoints" / "checkpoint-000002"), lr_schedule="cosine", lr_warmup_steps=0)
    _, constant = run(tmp_path, "k", colour_data, 2)
    run(tmp_path, "k", colour_data, 3, resume="latest")  # the constant schedule continues


def test_cached_latents_and_text_embeddings_train_the_same_weights(tmp_path):
    folder = colour_folder(tmp_path / "data", COLOURS, per_caption=1)
    plain = DataConfig(resolution=32, random_flip=True, caption_dropout=0.3)
    cached = DataConfig(resolution=32, random_flip=True, caption_dropout=0.3, cache_latents=True, cache_text_embeddings=True)
    config = TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-3, seed=3)
    start = micro_models().unet.state_dict()
    a = train(micro_models(), dataset_for(folder, plain, 3), config, tmp_path / "a", show_progress=False)
    b = train(micro_models(), dataset_for(folder, cached, 3), config, tmp_path / "b", show_progress=False)
    # Batched and one-by-one encoding differ by float rounding, which Adam's normalised steps
    # amplify for parameters with near-zero gradients; overall the two runs must agree closely,
    # while a different sample, caption or noise would change the whole update.
    moved = torch.cat([(v - start[k]).flatten() for k, v in a.unet.state_dict().items()]).norm()
    apart = torch.cat([(v - b.unet.state_dict()[k]).flatten() for k, v in a.unet.state_dict().items()]).norm()
    assert apart < 0.02 * moved


def test_gradient_checkpointing_and_text_encoder_training(tmp_path):
    folder = colour_folder(tmp_path / "data", COLOURS, per_caption=1)
    data = DataConfig(resolution=32)
    base = dict(max_steps=2, batch_size=3, learning_rate=1e-3, train_text_encoder=True)
    models = micro_models()
    text_before = {k: v.clone() for k, v in models.text_encoder.state_dict().items()}
    vae_before = {k: v.clone() for k, v in models.vae.state_dict().items()}
    a = train(models, dataset_for(folder, data), TrainConfig(**base), tmp_path / "a", show_progress=False)
    b = train(micro_models(), dataset_for(folder, data), TrainConfig(**base, gradient_checkpointing=True), tmp_path / "b",
              show_progress=False)
    for name, value in a.unet.state_dict().items():
        assert torch.allclose(value, b.unet.state_dict()[name], atol=1e-5), name
    assert any(not torch.equal(v, a.text_encoder.state_dict()[k]) for k, v in text_before.items())
    assert all(torch.equal(v, models.vae.state_dict()[k]) for k, v in vae_before.items())  # the VAE stays frozen


def test_frozen_text_encoder_and_lora_train_only_adapters(tmp_path):
    folder = colour_folder(tmp_path / "data", COLOURS, per_caption=1)
    models = micro_models()
    unet_before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in models.text_encoder.state_dict().items()}
    config = TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, lora_rank=2, checkpointing_steps=2)
    result = train(models, dataset_for(folder, DataConfig(resolution=32)), config, tmp_path / "l", show_progress=False)
    after = result.unet.state_dict()
    for name, value in unet_before.items():
        key = name.replace("to_q.weight", "to_q.base_layer.weight").replace("to_k.weight", "to_k.base_layer.weight")
        key = key.replace("to_v.weight", "to_v.base_layer.weight").replace("to_out.0.weight", "to_out.0.base_layer.weight")
        key = key.replace("to_out.0.bias", "to_out.0.base_layer.bias")
        assert torch.equal(value, after[key]), name
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in after.items())
    assert all(torch.equal(v, result.text_encoder.state_dict()[k]) for k, v in text_before.items())
    saved = load_checkpoint(resolve_resume(tmp_path / "l", "latest")).trainable
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose precision cannot change once set; this test
    needs bf16 after fp32 runs, so it resets that state before and after (as accelerate's tests do)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path, fresh_accelerate_state):
    folder = colour_folder(tmp_path / "data", COLOURS, per_caption=1)
    models = micro_models()
    start = {k: v.clone() for k, v in models.unet.state_dict().items()}
    config = TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-3, mixed_precision="bf16", ema_decay=0.9)
    result = train(models, dataset_for(folder, DataConfig(resolution=32)), config, tmp_path / "bf16", show_progress=False)
    assert math.isfinite(result.last_loss)
    assert all(p.dtype == torch.float32 for p in result.unet.parameters())  # autocast computes in bf16, stores fp32
    assert next(models.vae.parameters()).dtype == torch.bfloat16  # the frozen VAE runs in half precision
    assert any(not torch.equal(start[k], v) for k, v in result.unet.state_dict().items())
