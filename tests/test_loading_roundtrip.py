"""What ldm writes, ldm reads back: configuration, scheduler, generation defaults and name included,
in the same bytes every time."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.cli import main
from ldm.errors import ConfigError, LdmError
from ldm.loading import Components, load_components, save_diffusers, save_single_file
from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from ldm.models.text_encoder import load_tokenizer
from ldm.pipeline import Pipeline
from ldm.schedulers import SchedulerConfig

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "weights" / "ldm-shapes"


def _in_fresh_memory(*models: torch.nn.Module) -> None:
    """Move every weight out of its memory-mapped file into memory of torch's allocator.

    oneDNN's kernels give results that differ in the last bits for weights that are not 64-byte
    aligned; a file's tensors sit where the file puts them. Comparing outputs of models whose
    weights are all in fresh memory compares the weights and configuration alone.
    """
    for model in models:
        model.load_state_dict({key: value.clone() for key, value in model.state_dict().items()}, assign=True)


def _unet_output(components: Components) -> torch.Tensor:
    config = components.unet.config
    latents = torch.randn(1, config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return components.unet(latents, torch.tensor([500]), context)


def _image(pipe: Pipeline) -> torch.Tensor:
    _in_fresh_memory(pipe.unet, pipe.vae, pipe.text_encoder)
    return pipe("a red circle on a blue background", num_inference_steps=3, seed=7, output_type="pt").images


@pytest.fixture(scope="module")
def shapes_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shapes") / "shapes.safetensors"
    assert main(["convert", str(SHAPES), str(path)]) == 0
    return path


def test_default_model_comes_back_from_a_single_file(shapes_file, tmp_path):
    """ldm-shapes has 4 VAE GroupNorm groups, 2 text heads of width 32, VAE scaling 0.32321 and
    guidance 3: none of it follows SD's conventions, all of it comes back."""
    original, copy = Pipeline.from_pretrained(SHAPES), Pipeline.from_pretrained(shapes_file)
    assert copy.defaults == original.defaults and copy.defaults.guidance_scale == 3.0
    assert copy.unet.config == original.unet.config and copy.vae.config == original.vae.config
    assert copy.text_encoder.config.num_attention_heads == 2
    assert copy.name == "shapes"
    assert torch.equal(_image(copy), _image(original))

    folder = tmp_path / "folder"
    assert main(["convert", str(shapes_file), str(folder)]) == 0
    for name in ("generation_config.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert json.loads((folder / name).read_text()) == json.loads((SHAPES / name).read_text()), name
    assert main(["txt2img", "a red circle", "--model", str(shapes_file), "--steps", "2", "--quiet", "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _unusual_model() -> Components:
    """A random model that SD's conventions would read wrongly: U-Net heads (2, 4) instead of 8, 16
    GroupNorm groups, 4 text heads of width 16, VAE scaling 0.5, its own sizes, scheduler and
    generation defaults."""
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            block_out_channels=(32, 64),
            cross_attention_levels=(True, False),
            num_attention_heads=(2, 4),
            cross_attention_dim=64,
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=16,
        )
    ).eval()
    vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16, scaling_factor=0.5, sample_size=32)).eval()
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, hidden_act="quick_gelu")
    ).eval()
    scheduler = SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction")
    generation = {"guidance_scale": 2.0, "num_inference_steps": 12}
    return Components(unet, vae, text, load_tokenizer("sd1"), scheduler, "sd1", Path("unusual"), generation)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_unusual_model_comes_back_from_a_single_file(suffix, tmp_path):
    model = _unusual_model()
    back = load_components(save_single_file(model, tmp_path / f"unusual{suffix}"))
    assert back.unet.config == model.unet.config and back.vae.config == model.vae.config
    assert back.text_encoder.config.num_attention_heads == 4
    assert back.scheduler_config == model.scheduler_config
    assert back.generation_config == model.generation_config
    _in_fresh_memory(back.unet)
    assert torch.equal(_unet_output(back), _unet_output(model))
    ids = torch.arange(77).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(back.text_encoder(ids).last_hidden_state, model.text_encoder(ids).last_hidden_state)


def test_standard_model_keeps_the_released_layout(tmp_path):
    """A model read by SD's conventions gets no configuration metadata when written again: other
    tools see the usual file."""
    from tiny_models import save_diffusers_folder

    first = save_single_file(load_components(save_diffusers_folder(tmp_path / "sd1", "sd1")), tmp_path / "first.safetensors")
    model = load_components(_without_ldm_metadata(first, tmp_path / "released.safetensors"))
    path = save_single_file(model, tmp_path / "again.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "modelspec.prediction_type": "epsilon"}
    model.vae.config = replace(model.vae.config, sample_size=256)
    with safe_open(str(save_single_file(model, tmp_path / "small.safetensors")), "pt") as f:
        assert json.loads(f.metadata()["ldm.vae_config"])["sample_size"] == 256


def _without_ldm_metadata(path: Path, target: Path) -> Path:
    with safe_open(str(path), "pt") as f:
        save_file({key: f.get_tensor(key) for key in f.keys()}, str(target), {"format": "pt"})
    return target


def test_a_configuration_folder_describes_a_file_that_carries_none(shapes_file, tmp_path, capsys):
    bare = _without_ldm_metadata(shapes_file, tmp_path / "bare.safetensors")
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_components(bare)  # SD's 32 groups do not divide the VAE's width 16
    pipe = Pipeline.from_pretrained(bare, config=SHAPES)
    assert pipe.defaults.guidance_scale == 3.0 and pipe.vae.config.scaling_factor == 0.32321
    assert torch.equal(_image(pipe), _image(Pipeline.from_pretrained(SHAPES)))

    assert main(["convert", str(bare), str(tmp_path / "folder"), "--config", str(SHAPES)]) == 0
    assert (tmp_path / "folder" / "generation_config.json").is_file()
    out = tmp_path / "out"
    assert main(["txt2img", "a red circle", "--model", str(bare), "--config", str(SHAPES), "--steps", "2", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    for argv, message in (
        (["--model", str(SHAPES), "--config", str(SHAPES)], "drop --config"),
        (["--model", str(bare), "--config", str(tmp_path)], "not a model configuration folder"),
    ):
        assert main(["txt2img", "a red circle", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


_CONVERT = "import sys; from ldm.cli import main; sys.exit(main(['convert', *sys.argv[1:]]))"


@pytest.mark.parametrize("target", ["m.safetensors", "m.ckpt", "folder"])
def test_conversions_give_the_same_bytes(shapes_file, tmp_path, target):
    """Two conversions, one in another process (safetensors' metadata order changed from process to
    process), give the same bytes."""
    first, second = tmp_path / "a" / target, tmp_path / "b" / target
    assert main(["convert", str(shapes_file), str(first)]) == 0
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", _CONVERT, str(shapes_file), str(second)], check=True, env=env, capture_output=True)
    if first.is_dir():
        assert _folder_bytes(first) == _folder_bytes(second)
    else:
        assert first.read_bytes() == second.read_bytes()


def test_a_fine_tuned_model_keeps_its_base_models_files_and_its_own_name(tmp_path):
    """finetune saves a copy of the loaded Components with new networks, named after its run folder."""
    base = load_components(SHAPES)
    saved = save_diffusers(replace(base, unet=base.unet), tmp_path / "run-a" / "model", name="run-a")
    assert json.loads((saved / "generation_config.json").read_text()) == {"guidance_scale": 3.0}
    assert Pipeline.from_pretrained(saved).name == "run-a"
    assert main(["convert", str(saved), str(tmp_path / "copy.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "copy.safetensors"), str(tmp_path / "copy")]) == 0
    copy = Pipeline.from_pretrained(tmp_path / "copy")
    assert copy.name == "copy" and copy.defaults.guidance_scale == 3.0


def test_bad_metadata_is_one_line(shapes_file, tmp_path):
    with safe_open(str(shapes_file), "pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), {**metadata, "ldm.unet_config": "{not json"})
    with pytest.raises(LdmError, match="ldm.unet_config metadata of .*broken.safetensors is not valid JSON"):
        load_components(broken)
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial), {k: v for k, v in metadata.items() if k != "ldm.vae_config"})
    with pytest.raises(LdmError, match="only part of its configuration"):
        load_components(partial)
    for key, value, message in (
        ("ldm.scheduler_config", "[1]", "ldm.scheduler_config metadata of .* must hold a JSON object, not list"),
        ("ldm.unet_config", '{"sample_size": "big"}', "ldm.unet_config metadata of .*broken"),
        ("ldm.text_encoder_config", '{"layer_norm_eps": "abc"}', "ldm.text_encoder_config metadata of .*broken"),
    ):
        broken.unlink()
        save_file(tensors, str(broken), {**metadata, key: value})
        with pytest.raises(LdmError, match=message) as error:
            load_components(broken)
        assert "\n" not in str(error.value)


def test_an_sd_shaped_file_keeps_its_own_scheduler_and_generation_defaults(tmp_path):
    """A file of SD's shapes carries no network configs; what it recommends is read all the same."""
    from tiny_models import save_diffusers_folder

    first = save_single_file(load_components(save_diffusers_folder(tmp_path / "sd1", "sd1")), tmp_path / "first.safetensors")
    model = load_components(_without_ldm_metadata(first, tmp_path / "released.safetensors"))  # configs by SD's conventions
    model = replace(model, scheduler_config=SchedulerConfig(timestep_spacing="trailing"), generation_config={"guidance_scale": 2.0})
    path = save_single_file(model, tmp_path / "model.safetensors")
    with safe_open(str(path), "pt") as f:
        assert "ldm.unet_config" not in f.metadata() and "ldm.scheduler_config" in f.metadata()
    back = load_components(path)
    assert back.scheduler_config == model.scheduler_config and back.generation_config == {"guidance_scale": 2.0}
    assert Pipeline.from_pretrained(path).defaults.guidance_scale == 2.0
