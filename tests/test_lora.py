"""LoRA files: kohya key naming, apply == fuse, scale, diffusers reads our files, bad files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training_support import micro_models, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.errors import CheckpointError, InputError
from ldm.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_adapters, apply_lora, parse_lora_argument, read_lora, save_lora


def trained_lora(unet, text_encoder=None, rank=2, alpha=4.0, seed=0):
    """Adapters with random (non-zero) up weights, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    models = [add_adapters(unet, UNET_TARGETS, rank, alpha)]
    if text_encoder is not None:
        models.append(add_adapters(text_encoder, TEXT_ENCODER_TARGETS, rank, alpha))
    with torch.no_grad():
        for model in models:
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return models


def unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 4, 4, generator=generator)
    context = torch.randn(1, 77, 64, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context)


@pytest.fixture()
def lora_file(tmp_path):
    source = micro_models()
    trained_lora(source.unet, source.text_encoder)
    reference = unet_output(source.unet)
    return save_lora(tmp_path / "style.safetensors", source.unet, source.text_encoder), reference


def test_file_uses_kohya_names_with_alpha(lora_file):
    path, _ = lora_file
    tensors = load_file(str(path))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{key}.lora_down.weight"].shape == (2, 64)  # (rank, context dim)
    assert tensors[f"{key}.lora_up.weight"].shape == (32, 2)  # (inner dim, rank)
    assert float(tensors[f"{key}.alpha"]) == 4.0
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in tensors
    weights = read_lora(path)
    assert len(weights) == len(tensors) // 3
    assert {part for part, _ in weights} == {"unet", "text_encoder"}
    with pytest.raises(FileExistsError):
        save_lora(path, add_adapters(micro_models().unet, UNET_TARGETS, 2, 2.0))


def test_apply_reproduces_the_trained_model_and_fuse_matches(lora_file):
    path, reference = lora_file
    base = micro_models()
    plain = unet_output(base.unet)
    assert not torch.allclose(plain, reference, atol=1e-4)
    adapted = copy.deepcopy(base)
    assert apply_lora(adapted.unet, adapted.text_encoder, path) == "lora0"
    assert torch.allclose(unet_output(adapted.unet), reference, atol=1e-5)
    assert not any(p.requires_grad for name, p in adapted.unet.named_parameters() if "lora_" in name)
    fused = copy.deepcopy(base)
    assert apply_lora(fused.unet, fused.text_encoder, path, fuse=True) is None
    assert torch.allclose(unet_output(fused.unet), reference, atol=1e-5)
    assert set(fused.unet.state_dict()) == set(base.unet.state_dict())  # fusing adds no modules
    ids = base.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(fused.text_encoder(ids)[0], adapted.text_encoder(ids)[0], atol=1e-5)
        assert not torch.allclose(fused.text_encoder(ids)[0], base.text_encoder(ids)[0], atol=1e-4)


def test_scale_is_linear_in_the_weight_update(lora_file):
    path, _ = lora_file
    base = micro_models()
    half, full = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(half.unet, half.text_encoder, path, scale=0.5, fuse=True)
    apply_lora(full.unet, full.text_encoder, path, scale=1.0, fuse=True)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    original = base.unet.state_dict()[name]
    assert torch.allclose(half.unet.state_dict()[name] - original, 0.5 * (full.unet.state_dict()[name] - original), atol=1e-6)
    zero = copy.deepcopy(base)
    apply_lora(zero.unet, zero.text_encoder, path, scale=0.0)
    assert torch.allclose(unet_output(zero.unet), unet_output(base.unet), atol=1e-6)
    scaled = copy.deepcopy(base)
    apply_lora(scaled.unet, scaled.text_encoder, path, scale=0.5)
    assert torch.allclose(unet_output(scaled.unet), unet_output(half.unet), atol=1e-5)


def test_two_files_stack(lora_file, tmp_path):
    path, _ = lora_file
    other_source = micro_models()
    trained_lora(other_source.unet, seed=1)
    other = save_lora(tmp_path / "other.safetensors", other_source.unet)
    base = micro_models()
    stacked, fused = copy.deepcopy(base), copy.deepcopy(base)
    assert apply_lora(stacked.unet, stacked.text_encoder, path) == "lora0"
    assert apply_lora(stacked.unet, stacked.text_encoder, other) == "lora1"
    apply_lora(fused.unet, fused.text_encoder, path, fuse=True)
    apply_lora(fused.unet, fused.text_encoder, other, fuse=True)
    assert torch.allclose(unet_output(stacked.unet), unet_output(fused.unet), atol=1e-5)


def test_diffusers_reads_our_file_and_agrees(tmp_path):
    from tiny_models import save_diffusers_folder

    from ldm.loading import load_components

    folder = save_diffusers_folder(tmp_path / "model")
    ours = load_components(folder)
    trained = load_components(folder)
    trained_lora(trained.unet, rank=2, alpha=2.0)
    path = save_lora(tmp_path / "lora.safetensors", trained.unet)
    apply_lora(ours.unet, ours.text_encoder, path)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 64, generator=generator)
    with torch.no_grad():
        expected = pipe.unet(sample, 500, encoder_hidden_states=context).sample
        got = ours.unet(sample, torch.tensor([500]), context)
        base = load_components(folder).unet(sample, torch.tensor([500]), context)
    assert not torch.allclose(expected, base, atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-4)


def test_bad_files_are_clear_errors(tmp_path):
    models = micro_models()
    with pytest.raises(InputError, match="does not exist"):
        apply_lora(models.unet, models.text_encoder, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read LoRA file"):
        apply_lora(models.unet, models.text_encoder, tmp_path / "junk.safetensors")
    save_file({"model.diffusion_model.weight": torch.zeros(2)}, str(tmp_path / "checkpoint.safetensors"))
    with pytest.raises(CheckpointError, match="neither kohya"):
        apply_lora(models.unet, models.text_encoder, tmp_path / "checkpoint.safetensors")
    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not exist in the unet"):
        apply_lora(models.unet, models.text_encoder, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="no trained LoRA adapter"):
        save_lora(tmp_path / "none.safetensors", models.unet)


def test_parse_lora_argument():
    assert parse_lora_argument("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_argument("dir/style.safetensors:0.6")[1] == 0.6
    assert parse_lora_argument("C:/x/style.safetensors")[0].name == "style.safetensors"
