"""The default-model recipe: its config, and a tiny run of the whole training script end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_default_model.py"
SIZE_LIMIT = 40_000_000  # bytes; the limit for the shipped model


def _script():
    if "train_default_model" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_default_model"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_default_model"]


TINY = {
    "name": "tiny",
    "resolution": 64,
    "samples": 48,
    "seed": 0,
    "checkpoint_every": 4,
    "eval_prompts": 2,
    "vae": {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 64},
    "unet": {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "cross_attention_levels": [True, True],
        "num_attention_heads": [2, 2],
        "cross_attention_dim": 32,
        "sample_size": 8,
    },
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
    "vae_training": {"steps": 12, "batch_size": 4, "learning_rate": 2e-3, "kl_weight": 1e-6, "crop": 32},
    "diffusion_training": {"steps": 6, "batch_size": 4, "learning_rate": 5e-4, "warmup_steps": 2},
}


def test_shipped_recipe_fits_the_size_limit():
    script = _script()
    recipe = script.Recipe.from_json(REPO / "configs" / "ldm-shapes.json")
    assert recipe.resolution >= 64 and recipe.vae.downsample_factor == 8 and recipe.vae.latent_channels == 4
    assert recipe.unet.cross_attention_dim == recipe.text_encoder.hidden_size
    assert recipe.diffusion_training.caption_dropout > 0  # classifier-free guidance needs the unconditional branch
    with torch.device("meta"):
        unet = script.UNet(recipe.unet)
        vae = script.AutoencoderKL(recipe.vae)
        text = script.CLIPTextModel(recipe.text_encoder.clip_config())
    parameters = sum(p.numel() for m in (unet, vae, text) for p in m.parameters())
    assert parameters * 4 < SIZE_LIMIT


def test_recipe_rejects_unknown_keys(tmp_path):
    script = _script()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**TINY, "vae_training": {**TINY["vae_training"], "stepz": 3}}))
    with pytest.raises(ConfigError, match="stepz"):
        script.Recipe.from_json(path)


def test_recommended_guidance_is_the_best_on_the_targets_attributes():
    script = _script()
    scores = {
        1.0: {"background": 0.7, "color": 0.5, "shape": 0.5, "position": 1.0},
        3.0: {"background": 1.0, "color": 0.9, "shape": 0.6, "position": 0.2},
        7.0: {"background": 1.0, "color": 0.6, "shape": 0.7, "position": 0.2},
    }
    assert script.best_guidance(scores) == 3.0


@pytest.mark.parametrize("initial_logvar", [0.0, -8.0])
def test_vae_posterior_starts_at_the_recipes_log_variance(tmp_path, initial_logvar):
    script = _script()
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "vae_training": {**TINY["vae_training"], "steps": 0, "initial_logvar": initial_logvar}}))
    recipe = script.Recipe.from_json(config)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    vae, _ = script.train_vae(recipe, images, tmp_path)
    with torch.no_grad():
        logvar = vae.encode(script.to_pixels(images)).logvar
    assert abs(logvar.mean().item() - initial_logvar) < 1.0


@pytest.mark.slow
def test_training_script_end_to_end_and_resume(tmp_path):
    """Train a tiny model, load it in ldm and in diffusers (same image), rerun: resumes and reproduces it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from ldm.pipeline import Pipeline

    script = _script()
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    work, out = tmp_path / "work", tmp_path / "model"
    assert script.main(["--config", str(config), "--work-dir", str(work), "--out", str(out)]) == 0

    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (out / part).is_file(), part
    record = json.loads((out / "training.json").read_text())
    assert record["recipe"]["vae_training"]["steps"] == 12 and record["denoiser"]["steps"] == 6
    assert set(record["seconds"]) == {"data", "vae", "unet_and_text_encoder"} and record["total_seconds"] > 0
    assert set(record["adherence_20_steps_by_guidance"]) == {"1.0", "3.0", "7.0"}
    recommended = json.loads((out / "generation_config.json").read_text())
    assert recommended == {"guidance_scale": record["recommended_guidance_scale"]}
    assert Pipeline.from_pretrained(out).defaults.guidance_scale == record["recommended_guidance_scale"]
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(record["scaling_factor"]) and vae_config["scaling_factor"] > 0

    prompt = "a red circle on a blue background"
    ours = Pipeline.from_pretrained(out)
    mine = ours(prompt, num_inference_steps=4, guidance_scale=3.0, scheduler="ddim", seed=5, output_type="np").images[0]
    theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    reference = theirs(prompt, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
                       output_type="np").images[0]
    assert mine.shape == reference.shape == (64, 64, 3)
    assert np.abs(mine - reference).max() < 2e-3

    # A second run over the same work folder trains nothing new and writes the same weights.
    again = tmp_path / "again"
    assert script.main(["--config", str(config), "--work-dir", str(work), "--out", str(again)]) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        first, second = load_file(out / part), load_file(again / part)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), part
