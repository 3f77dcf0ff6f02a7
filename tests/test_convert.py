"""`ldm convert`: round trips keep every tensor bit-identical, and diffusers reads what we write."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import save_diffusers_folder

from ldm.cli import main

SD2_UNUSED_TEXT = (
    "cond_stage_model.model.transformer.resblocks.3.",
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
)


def _folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder, keyed by component/key (text keys without "text_model.")."""
    tensors = {}
    for weights in sorted(folder.glob("*/*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                tensors[f"{weights.parent.name}/{key.removeprefix('text_model.')}"] = f.get_tensor(key)
    return tensors


def _file_tensors(path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    return {family: save_diffusers_folder(root / family, family) for family in ("sd1", "sd2")}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_to_single_to_diffusers_is_bit_identical(family, folders, tmp_path, capsys):
    single = tmp_path / "model.safetensors"
    back = tmp_path / "back"
    assert main(["convert", str(folders[family]), str(single)]) == 0
    assert main(["convert", str(single), str(back)]) == 0
    assert f"{family} (" in capsys.readouterr().out
    _same(_folder_tensors(folders[family]), _folder_tensors(back))
    original = json.loads((folders[family] / "scheduler" / "scheduler_config.json").read_text())
    written = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert written["prediction_type"] == original["prediction_type"]
    assert json.loads((back / "unet" / "config.json").read_text())["block_out_channels"] == list(
        json.loads((folders[family] / "unet" / "config.json").read_text())["block_out_channels"]
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_to_diffusers_to_single_keeps_every_used_tensor(family, folders, tmp_path):
    first = tmp_path / "first.ckpt"
    assert main(["convert", str(folders[family]), str(first)]) == 0
    original = _file_tensors(first)
    # Make SD 2's unused text tensors distinguishable: they are the only ones allowed to change.
    if family == "sd2":
        for key in [k for k in original if k.startswith(SD2_UNUSED_TEXT)]:
            original[key] = torch.randn(original[key].shape)
        torch.save({"state_dict": original}, tmp_path / "edited.ckpt")
        first = tmp_path / "edited.ckpt"
    assert main(["convert", str(first), str(tmp_path / "folder")]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "again.safetensors")]) == 0
    again = _file_tensors(tmp_path / "again.safetensors")
    assert again.keys() == original.keys()
    changed = {k for k in original if not torch.equal(original[k], again[k])}
    if family == "sd1":
        assert changed == set()
    else:
        assert changed == {k for k in original if k.startswith(SD2_UNUSED_TEXT)}
        assert len(changed) == 14


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_written_folder_loads_in_diffusers(family, folders, tmp_path):
    from diffusers import StableDiffusionPipeline

    ours = tmp_path / "ours"
    assert main(["convert", str(folders[family]), str(tmp_path / "m.ckpt")]) == 0
    assert main(["convert", str(tmp_path / "m.ckpt"), str(ours)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(ours, local_files_only=True)
    ref = StableDiffusionPipeline.from_pretrained(folders[family], local_files_only=True)
    for a, b in ((pipe.unet, ref.unet), (pipe.vae, ref.vae), (pipe.text_encoder, ref.text_encoder)):
        _same(a.state_dict(), b.state_dict())
    assert pipe.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    assert pipe.tokenizer("a photo of a cat").input_ids == ref.tokenizer("a photo of a cat").input_ids
    assert pipe.tokenizer.pad_token == ref.tokenizer.pad_token


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_loads_in_diffusers_from_single_file(family, folders, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(folders[family]), str(single)]) == 0
    pipe = StableDiffusionPipeline.from_single_file(single, config=str(folders[family]), local_files_only=True)
    ref = StableDiffusionPipeline.from_pretrained(folders[family], local_files_only=True)
    for a, b in ((pipe.unet, ref.unet), (pipe.vae, ref.vae), (pipe.text_encoder, ref.text_encoder)):
        _same(a.state_dict(), b.state_dict())


def test_options_and_refusals(folders, tmp_path, capsys):
    half = tmp_path / "half.safetensors"
    assert main(["convert", str(folders["sd1"]), str(half), "--dtype", "fp16", "--prediction-type", "v_prediction"]) == 0
    tensors = _file_tensors(half)
    assert tensors["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert "v_pred" in tensors

    before = half.read_bytes()
    assert main(["convert", str(folders["sd1"]), str(half)]) == 2
    assert half.read_bytes() == before
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# SD 1.5's scheduler_config.json as released: it leaves out timestep_spacing and prediction_type.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def test_keys_the_model_left_out_stay_left_out_through_conversions(tmp_path):
    """Written back as set, they would pin "leading" spacing on every sampler of the copy."""
    from ldm.loading import load_components
    from ldm.schedulers import create

    folder = save_diffusers_folder(tmp_path / "sd15", "sd1")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    single, back = tmp_path / "model.safetensors", tmp_path / "back"
    assert main(["convert", str(folder), str(single)]) == 0
    assert main(["convert", str(single), str(back)]) == 0
    with safe_open(str(single), "pt") as f:
        assert "ldm.scheduler_config" not in f.metadata()  # SD's released config: nothing to record
    written = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert "timestep_spacing" not in written  # a single file states its prediction type: that one is set
    assert (written["steps_offset"], written["beta_schedule"], written["prediction_type"]) == (1, "scaled_linear", "epsilon")
    for path in (single, back):
        config = load_components(path).scheduler_config
        assert create("dpm-solver++", config).config.timestep_spacing == "linspace"
        assert create("ddim", config).config.timestep_spacing == "leading"
