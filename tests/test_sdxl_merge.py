"""`ldm merge` on SDXL (tests/test_merge.py for SD): weighted sum and add difference on every tensor of the parts
merged (SDXL's text encoders are its conditioner's two), a merged folder's image, LoRAs on the U-Net and both text
encoders baked in as ``Adapters.load(fuse=True)`` fuses them (bigG's q/k/v live in one fused tensor in the file),
and models of two families refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_sdxl
import torch
from test_merge import ALPHA, _merge, _noisy, _read
from test_training_support import one_torch_thread  # noqa: F401 - an autouse fixture: one torch thread per module

from ldm.cli import main
from ldm.loading import load_components
from ldm.loading.writers import write_safetensors

PREFIXES = {"unet": ("model.diffusion_model.",), "text_encoder": ("conditioner.embedders.",), "vae": ("first_stage_model.",)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL base as a single file (A), two perturbed copies (B, C), and the refiner as a file."""
    root = tmp_path_factory.mktemp("sdxl-merge")
    paths = {}
    for kind in ("base", "refiner"):
        folder = tiny_sdxl.save_folder(root / kind, kind)
        paths[kind] = root / f"{kind}.safetensors"
        assert main(["convert", str(folder), str(paths[kind])]) == 0
    tensors, metadata = _read(paths["base"])
    for name, seed in (("b", 1), ("c", 2)):
        paths[name] = root / f"{name}.safetensors"
        write_safetensors(paths[name], _noisy(tensors, seed), metadata)
    paths["a"] = paths["base"]
    return paths


def test_weighted_sum_merges_both_text_encoders_and_every_part_asked(models, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert _merge(models["a"], models["b"], "--alpha", ALPHA, "--parts", "unet,text_encoder", out) == 0
    (a, _), (b, _), (merged, _) = _read(models["a"]), _read(models["b"]), _read(out)
    assert merged.keys() == a.keys()
    merged_prefixes = PREFIXES["unet"] + PREFIXES["text_encoder"]
    assert any(key.startswith("conditioner.embedders.1.model.") for key in a)  # bigG, in OpenCLIP's names
    for key, value in a.items():
        if key.startswith(merged_prefixes) and value.is_floating_point():
            assert torch.allclose(merged[key], (1 - ALPHA) * value + ALPHA * b[key], atol=1e-6, rtol=0), key
        else:
            assert torch.equal(merged[key], value), key  # the VAE and buffers: A's


def test_add_difference_to_a_folder_gives_the_direct_computation_s_image(models, tmp_path):
    from ldm.pipeline import Pipeline

    (a, metadata), (b, _), (c, _) = _read(models["a"]), _read(models["b"]), _read(models["c"])
    direct = {k: v + ALPHA * (b[k] - c[k]) if k.startswith(PREFIXES["unet"]) and v.is_floating_point() else v for k, v in a.items()}
    write_safetensors(tmp_path / "direct.safetensors", direct, metadata)
    folder = tmp_path / "merged"
    assert _merge(models["a"], models["b"], models["c"], "--alpha", ALPHA, folder) == 0
    assert (folder / "text_encoder_2").is_dir()
    call = dict(prompt="a red cat", num_inference_steps=2, height=64, width=64, seed=3, output_type="pt")
    expected = Pipeline.from_pretrained(tmp_path / "direct.safetensors")(**call).images
    assert torch.allclose(Pipeline.from_pretrained(folder)(**call).images, expected, atol=1e-5)


def _sdxl_lora(path: Path, model: Path) -> Path:
    """kohya LoRAs on a U-Net cross-attention projection, CLIP ViT-L's v projection and bigG's q projection
    (a slice of the file's fused in_proj_weight)."""
    from ldm.adapters.keys import module_lookup

    parts = load_components(model)
    modules = {
        "lora_unet_": module_lookup("unet", parts.unet),
        "lora_te1_": module_lookup("text_encoder", parts.text_encoder),
        "lora_te2_": module_lookup("text_encoder_2", parts.text_encoder_2),
    }
    ends = {"lora_unet_": "attn2_to_q", "lora_te1_": "self_attn_v_proj", "lora_te2_": "self_attn_q_proj"}
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for prefix, lookup in modules.items():
        name = next(name for name in lookup if name.endswith(ends[prefix]) and name.startswith(("down_blocks", "text_model")))
        out_width, in_width = lookup[name][1].weight.shape
        tensors[f"{prefix}{name}.lora_down.weight"] = 0.1 * torch.randn(2, in_width, generator=generator)
        tensors[f"{prefix}{name}.lora_up.weight"] = 0.1 * torch.randn(out_width, 2, generator=generator)
        tensors[f"{prefix}{name}.alpha"] = torch.tensor(1.0)
    write_safetensors(path, tensors, {})
    return path


def test_sdxl_loras_bake_in_as_fused_adapters(models, tmp_path):
    from ldm.adapters import Adapters

    lora = _sdxl_lora(tmp_path / "style.safetensors", models["a"])
    out = tmp_path / "with-lora.safetensors"
    assert _merge(models["a"], "--lora", f"{lora}:0.7", out) == 0
    fused = load_components(models["a"])
    Adapters(fused.unet, fused.text_encoder, fused.text_encoder_2).load(lora, scale=0.7, fuse=True)
    merged, base = load_components(out), load_components(models["a"])
    changed = 0
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, got, before = (getattr(m, part).state_dict() for m in (fused, merged, base))
        for key in expected:
            assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=0), (part, key)
        changed += sum(not torch.equal(before[key], got[key]) for key in before)
    assert changed == 3  # one weight in each network


def test_a_base_and_a_refiner_are_refused_in_one_line(models, tmp_path, capsys):
    assert _merge(models["a"], models["refiner"], tmp_path / "mixed.safetensors") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is SDXL but" in err and "is an SDXL refiner; merge models of one family" in err
    assert not (tmp_path / "mixed.safetensors").exists()


def test_two_refiners_merge_their_u_net_and_bigg(models, tmp_path):
    """A refiner has bigG alone, as embedder 0: ``text_encoder`` merges it."""
    (a, _) = _read(models["refiner"])
    noisy = tmp_path / "refiner-b.safetensors"
    write_safetensors(noisy, _noisy(a, 3), {})
    out = tmp_path / "refiners.safetensors"
    assert _merge(models["refiner"], noisy, "--alpha", ALPHA, "--parts", "unet,text_encoder", out) == 0
    (b, _), (merged, _) = _read(noisy), _read(out)
    assert any(key.startswith("conditioner.embedders.0.model.") for key in a)
    for key, value in a.items():
        if key.startswith(PREFIXES["unet"] + PREFIXES["text_encoder"]) and value.is_floating_point():
            assert torch.allclose(merged[key], (1 - ALPHA) * value + ALPHA * b[key], atol=1e-6, rtol=0), key
        else:
            assert torch.equal(merged[key], value), key
    assert load_components(out).text_encoder is None and load_components(out).text_encoder_2 is not None
