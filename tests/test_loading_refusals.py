"""Models ldm cannot run, and configurations no machine could build, are refused at load time in
one line that says which, before any network is built."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import save_diffusers_folder

from ldm.cli import main
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.loading import load_components, save_single_file
from ldm.models import UNetConfig, VAEConfig

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("refusals") / "sd1", "sd1")


@pytest.fixture(scope="module")
def sd1_state(sd1_folder, tmp_path_factory) -> dict[str, torch.Tensor]:
    path = save_single_file(load_components(sd1_folder), tmp_path_factory.mktemp("file") / "sd1.safetensors")
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _widened_folder(source, target, in_channels: int):
    """A copy of ``source`` whose U-Net takes ``in_channels`` inputs (a consistent, loadable folder)."""
    shutil.copytree(source, target)
    config_path = target / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = in_channels
    config_path.write_text(json.dumps(config))
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    state["conv_in.weight"] = torch.randn(state["conv_in.weight"].shape[0], in_channels, 3, 3)
    save_file(state, str(weights), {"format": "pt"})
    return target


def _widened_file(state, path, in_channels: int):
    widened = dict(state)
    widened[CONV_IN] = torch.randn(state[CONV_IN].shape[0], in_channels, 3, 3)
    save_file(widened, str(path))
    return path


@pytest.mark.parametrize(
    "in_channels, message",
    [
        # 9 (an inpainting model) loads: tests/test_inpaint.py
        (8, "is an instruct-pix2pix model (U-Net takes 8 input channels, the VAE makes 4)"),
        (5, "has a U-Net that takes 5 channels but a VAE with 4 latent channels"),
    ],
)
def test_models_whose_unet_takes_more_than_latents_are_refused(sd1_folder, sd1_state, tmp_path, capsys, in_channels, message):
    folder = _widened_folder(sd1_folder, tmp_path / "folder", in_channels)
    single = _widened_file(sd1_state, tmp_path / "model.safetensors", in_channels)
    for path in (folder, single):
        with pytest.raises(CheckpointError) as info:
            load_components(path)
        assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    code = main(["txt2img", "a cat", "--model", str(single), "--steps", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "what, key, value",
    [
        ("UNet", "sample_size", 100000),
        ("UNet", "block_out_channels", [320, 640, 1280, 10**9]),
        ("UNet", "layers_per_block", 10**6),
        ("UNet", "cross_attention_dim", 10**9),
        ("UNet", "norm_num_groups", 0),
        ("VAE", "block_out_channels", [10**9]),
        ("VAE", "latent_channels", 10**6),
        ("VAE", "sample_size", 10**7),
    ],
)
def test_absurd_network_configs_name_the_key(what, key, value):
    config = {"norm_num_groups": 1, key: value}
    with pytest.raises(ConfigError, match=f"{what} config key '{key}'=.* ldm accepts"):
        (UNetConfig if what == "UNet" else VAEConfig).from_diffusers(config)


def test_too_many_levels_are_refused():
    with pytest.raises(ConfigError, match="'block_out_channels' has 12 levels"):
        VAEConfig.from_diffusers({"block_out_channels": [32] * 12, "down_block_types": ["DownEncoderBlock2D"] * 12,
                                  "up_block_types": ["UpDecoderBlock2D"] * 12})  # fmt: skip


@pytest.mark.parametrize(
    "part, key, value",
    [
        ("unet", "sample_size", 100000),
        ("vae", "layers_per_block", 10**5),
        ("text_encoder", "num_hidden_layers", 10**6),
        ("text_encoder", "hidden_size", 10**9),
    ],
)
def test_absurd_folder_configs_are_refused_before_building(sd1_folder, tmp_path, capsys, part, key, value):
    folder = tmp_path / "model"
    shutil.copytree(sd1_folder, folder)
    config_path = folder / part / "config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"config key '{key}'={value} is out of range"):
        load_components(folder)
    assert main(["convert", str(folder), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1


def test_raw_pickle_is_refused_as_code_not_as_a_torch_bug(tmp_path, capsys):
    """A plain pickle (not torch.save's zip) is refused by torch's weights-only unpickler with a
    request to file an issue; ldm says what the file is instead, in one line, without warnings."""
    path = tmp_path / "raw.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"x": 1.0}, "step": 3}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LdmError) as info:
            load_components(path)
    message = str(info.value)
    assert message.startswith(f"{path} holds pickled Python objects beyond tensors; ldm does not run code from checkpoints")
    assert "convert it to .safetensors with a trusted tool" in message and "issue" not in message
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds pickled Python objects" in err and err.count("\n") == 1


def test_bytes_that_are_no_torch_file_are_refused_before_torch_reads_them(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(b"these are not weights\n" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LdmError, match="is not a readable PyTorch checkpoint \\(neither torch.save's zip nor its older format\\)"):
            load_components(path)
