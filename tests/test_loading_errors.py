"""Every way a checkpoint can be bad gives a one-line CheckpointError that says what to do."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import save_diffusers_folder

from ldm.errors import CheckpointError
from ldm.loading import load_components, save_diffusers, save_single_file


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    folder = save_diffusers_folder(root / "folder", "sd1")
    return save_single_file(load_components(folder), root / "model.safetensors")


@pytest.fixture(scope="module")
def sd1_state(sd1_file) -> dict[str, torch.Tensor]:
    with safe_open(str(sd1_file), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _error(path, **options) -> str:
    with pytest.raises(CheckpointError) as info:
        load_components(path, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


class _Exploit:
    """A pickle payload that would create a marker file when unpickled by plain torch.load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(str(marker))}, path)
    message = _error(path)
    assert not marker.exists()
    assert "evil.ckpt" in message and "posix.system" in message and "can run code" in message


def test_lightning_callback_in_released_ckpt_is_read_inertly(sd1_state, tmp_path, monkeypatch):
    """The released SD 1.x .ckpt files pickle a Lightning ModelCheckpoint beside the weights;
    it is unpickled as an inert stand-in, without importing pytorch_lightning."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    path = tmp_path / "lightning.ckpt"
    callbacks = {ModelCheckpoint: ModelCheckpoint()}
    torch.save({"state_dict": sd1_state, "global_step": 470000, "callbacks": callbacks}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    loaded = load_components(path)
    assert loaded.family == "sd1"
    assert "pytorch_lightning" not in sys.modules


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(sd1_file, sd1_state, tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd1_state}, whole)
    else:
        whole.write_bytes(sd1_file.read_bytes())
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    message = _error(cut)
    assert "cut" in message and "truncated" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_not_a_checkpoint(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are my notes, not a model\n")
    assert "notes" in _error(path)


def test_missing_path_and_folder_without_model(tmp_path):
    assert "does not exist" in _error(tmp_path / "nowhere.safetensors")
    (tmp_path / "empty").mkdir()
    assert "not a diffusers model" in _error(tmp_path / "empty")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    assert "unknown architecture" in _error(path)
    sdxl = tmp_path / "sdxl.safetensors"
    sdxl_keys = ("conditioner.embedders.0.transformer.x", "model.diffusion_model.input_blocks.0.0.weight")
    save_file({key: torch.zeros(1) for key in sdxl_keys}, str(sdxl))
    assert "SDXL" in _error(sdxl)


def test_missing_and_unexpected_keys_are_listed(sd1_state, tmp_path):
    state = dict(sd1_state)
    removed = [k for k in state if k.startswith("model.diffusion_model.output_blocks.2.")]
    for key in removed:
        del state[key]
    state["model.diffusion_model.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    message = _error(path)
    assert f"{len(removed)} missing key(s)" in message
    assert sorted(removed)[0] in message
    assert "1 unexpected key(s) (model.diffusion_model.extra.weight)" in message


def test_shape_mismatch_names_key_and_both_shapes(sd1_state, tmp_path):
    state = dict(sd1_state)
    key = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"
    shape = list(state[key].shape)
    state[key] = torch.zeros(shape[0], shape[1] + 1)
    path = tmp_path / "bad_shape.safetensors"
    save_file(state, str(path))
    message = _error(path)
    assert key in message and str([shape[0], shape[1] + 1]) in message and str(shape) in message


def test_unused_sd1_position_ids_are_shape_checked(sd1_state, tmp_path):
    state = dict(sd1_state)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(70)[None]
    path = tmp_path / "positions.safetensors"
    save_file(state, str(path))
    assert "position_ids" in _error(path)


def test_text_width_must_match_unet_context(sd1_state, tmp_path):
    state = {k: v for k, v in sd1_state.items() if not k.startswith("cond_stage_model.")}
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(49408, 128)
    state["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] = torch.zeros(77, 128)
    state["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(256, 128)
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    assert "different models" in _error(path)


def test_never_overwrites(sd1_file, tmp_path):
    components = load_components(sd1_file)
    with pytest.raises(CheckpointError, match="already exists"):
        save_single_file(components, sd1_file)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        save_diffusers(components, tmp_path / "taken")
    with pytest.raises(CheckpointError, match=r"\.safetensors or \.ckpt"):
        save_single_file(components, tmp_path / "model.pt")
