"""LoRA files: kohya key naming, apply == fuse, scale, diffusers reads our files, bad files."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training_support import MICRO_UNET, micro_models, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.errors import CheckpointError, InputError
from ldm.adapters import Adapters, parse_lora_argument, read_adapter
from ldm.adapters.training import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_adapters, save_lora


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
    weights = read_adapter(path)
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
    assert Adapters(adapted.unet, adapted.text_encoder).load(path) == "style"
    assert torch.allclose(unet_output(adapted.unet), reference, atol=1e-5)
    assert set(adapted.unet.state_dict()) == set(base.unet.state_dict())  # weights are patched: no layers added
    assert [p.requires_grad for p in adapted.unet.parameters()] == [p.requires_grad for p in base.unet.parameters()]
    fused = copy.deepcopy(base)
    assert Adapters(fused.unet, fused.text_encoder).load(path, fuse=True) == "style"
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
    Adapters(half.unet, half.text_encoder).load(path, scale=0.5, fuse=True)
    Adapters(full.unet, full.text_encoder).load(path, scale=1.0, fuse=True)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    original = base.unet.state_dict()[name]
    assert torch.allclose(half.unet.state_dict()[name] - original, 0.5 * (full.unet.state_dict()[name] - original), atol=1e-6)
    zero = copy.deepcopy(base)
    Adapters(zero.unet, zero.text_encoder).load(path, scale=0.0)
    assert torch.allclose(unet_output(zero.unet), unet_output(base.unet), atol=1e-6)
    scaled = copy.deepcopy(base)
    Adapters(scaled.unet, scaled.text_encoder).load(path, scale=0.5)
    assert torch.allclose(unet_output(scaled.unet), unet_output(half.unet), atol=1e-5)


def test_two_files_stack(lora_file, tmp_path):
    path, _ = lora_file
    other_source = micro_models()
    trained_lora(other_source.unet, seed=1)
    other = save_lora(tmp_path / "other.safetensors", other_source.unet)
    base = micro_models()
    stacked, fused = copy.deepcopy(base), copy.deepcopy(base)
    stack, fusing = Adapters(stacked.unet, stacked.text_encoder), Adapters(fused.unet, fused.text_encoder)
    assert [stack.load(path), stack.load(other), stack.load(other)] == ["style", "other", "other_2"]
    for file in (path, other, other):
        fusing.load(file, fuse=True)
    assert torch.allclose(unet_output(stacked.unet), unet_output(fused.unet), atol=1e-5)


def test_diffusers_reads_our_file_and_agrees(tmp_path):
    from tiny_models import save_diffusers_folder

    from ldm.loading import load_components

    folder = save_diffusers_folder(tmp_path / "model")
    ours = load_components(folder)
    trained = load_components(folder)
    trained_lora(trained.unet, rank=2, alpha=2.0)
    path = save_lora(tmp_path / "lora.safetensors", trained.unet)
    Adapters(ours.unet, ours.text_encoder).load(path)

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
        Adapters(models.unet, models.text_encoder).load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read LoRA file"):
        Adapters(models.unet, models.text_encoder).load(tmp_path / "junk.safetensors")
    save_file({"model.diffusion_model.weight": torch.zeros(2)}, str(tmp_path / "checkpoint.safetensors"))
    with pytest.raises(CheckpointError, match="neither kohya"):
        Adapters(models.unet, models.text_encoder).load(tmp_path / "checkpoint.safetensors")
    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not exist in the unet"):
        Adapters(models.unet, models.text_encoder).load(tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="no trained LoRA adapter"):
        save_lora(tmp_path / "none.safetensors", models.unet)


def test_parse_lora_argument():
    assert parse_lora_argument("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_argument("dir/style.safetensors:0.6")[1] == 0.6
    assert parse_lora_argument("C:/x/style.safetensors")[0].name == "style.safetensors"
    assert parse_lora_argument("C:/x/style.safetensors:-0.5") == (Path("C:/x/style.safetensors"), -0.5)
    for text, scale in (("style.safetensors:abc", "'abc'"), ("style.safetensors:", "''")):
        with pytest.raises(InputError, match=f"--lora {text}: scale {scale} is not a number"):
            parse_lora_argument(text)


def test_a_colon_in_an_existing_file_name_is_no_scale(tmp_path):
    path = tmp_path / "style:v2.safetensors"
    path.write_bytes(b"")
    assert parse_lora_argument(str(path)) == (path, 1.0)
    assert parse_lora_argument(f"{path}:0.5") == (path, 0.5)


@pytest.mark.parametrize(
    "argument, message",
    [
        ("{lora}:abc", "scale 'abc' is not a number"),
        ("{lora}:inf", "the LoRA scale for .* must be a finite number, got inf"),
        ("{tmp}", "is a folder, not a LoRA file"),
        ("{tmp}/missing.safetensors:0.5", "LoRA file .*missing.safetensors does not exist"),
    ],
)
def test_cli_lora_argument_errors_are_one_line(argument, message, lora_file, tmp_path, capsys):
    from ldm.cli import main

    path, _ = lora_file
    argument = argument.format(lora=path, tmp=tmp_path)
    assert main(["txt2img", "a cat", "--model", str(tmp_path), "--lora", argument, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(f"^ldm txt2img: error: .*{message}", err)


def test_cli_refuses_a_broken_lora_file_before_generating(tmp_path, capsys):
    from test_training_support import save_micro_model

    from ldm.cli import main

    model = save_micro_model(tmp_path / "model")
    path = tmp_path / "nan.safetensors"
    save_file(with_value(DOWN, float("nan")), str(path))
    out = tmp_path / "out"
    argv = ["txt2img", "a cat", "--model", str(model), "--lora", f"{path}:0.8", "--steps", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"ldm txt2img: error: {path}: key '{DOWN}' holds NaN or infinite values" in err
    assert not out.exists()


# --- LoRA on every layer kind, fused and unfused ----------------------------------------------------------

def adaptable_modules(model):
    """``{module path: module}`` of every Linear and Conv2d: what a kohya or LCM LoRA may adapt."""
    return {name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def random_pair(module, rank, generator):
    """Random (down, up) for ``module`` in kohya's shapes: a conv's down has its kernel, its up is 1x1."""
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
    else:
        down = torch.randn(rank, module.in_features, generator=generator)
        up = torch.randn(module.out_features, rank, generator=generator)
    return down * 0.2, up * 0.2


def kohya_key(part, name):
    if part == "text_encoder" and not name.startswith("text_model."):
        name = "text_model." + name  # kohya spells CLIP paths from text_model, as transformers 4 nests them
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + name.replace(".", "_")


def write_lora(path, pairs, layout, alpha=None):
    """``pairs`` = {(part, module path): (down, up)} as a kohya file (with ``alpha``) or a diffusers-peft one."""
    state = {}
    for (part, name), (down, up) in pairs.items():
        if layout == "kohya":
            key = kohya_key(part, name)
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            if alpha is not None:
                state[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            state[f"{part}.{name}.lora_A.weight"], state[f"{part}.{name}.lora_B.weight"] = down, up
    save_file(state, str(path))
    return path


def every_layer_pairs(unet, text_encoder, rank=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    parts = {"unet": unet, "text_encoder": text_encoder}
    return {
        (part, name): random_pair(module, rank, generator)
        for part, model in parts.items()
        for name, module in adaptable_modules(model).items()
    }


# MICRO_UNET has one channel per GroupNorm group, which cancels the time embedding's per-channel shift (the
# output ignores the timestep); with 8 groups a LoRA on the time embedding shows.
LORA_UNET = dataclasses.replace(MICRO_UNET, norm_num_groups=8)


def reference_pipeline():
    """A diffusers pipeline with a LORA_UNET-shaped random U-Net and the tiny CLIP, and ldm's copies of
    both networks. A U-Net forward at 64x64 latents takes a quarter of the tiny SD U-Net's time (2 heads at
    4096 tokens instead of 8, and no 1024-token level), with every kind of layer still present."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_models import clip_text_model, clip_tokenizer, diffusers_vae

    from ldm.models import UNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(LORA_UNET.to_diffusers()).eval()
    reference = StableDiffusionPipeline(
        vae=diffusers_vae(), text_encoder=clip_text_model("sd1"), tokenizer=clip_tokenizer("sd1"), unet=unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ours = UNet(LORA_UNET).eval()
    ours.load_state_dict(unet.state_dict(), strict=True)
    return reference, ours, copy.deepcopy(reference.text_encoder)


def test_every_layer_fused_unfused_and_diffusers_agree_at_512px(tmp_path, monkeypatch):
    """A kohya file on every Linear and Conv2d of the U-Net and CLIP, at 64x64 latents (a 512x512 image),
    where every fast path runs: sub-pixel upsampling from 32x32, attention as convolutions, oneDNN linears,
    GEGLU's split product; convs are sliced from 16 channels so the sliced path runs on the 32x32 maps."""
    from ldm.kernels import conv as conv_kernels

    monkeypatch.setattr(conv_kernels, "SLICED_CONV_CHANNELS", 16)
    reference, unet, text_encoder = reference_pipeline()
    pairs = every_layer_pairs(unet, text_encoder)
    path = write_lora(tmp_path / "all.safetensors", pairs, "kohya", alpha=3.0)  # alpha/rank = 1.5
    assert len(read_adapter(path)) == len(pairs) == len(adaptable_modules(unet)) + 12
    reference.load_lora_weights(str(path))
    unfused = (unet, text_encoder)
    fused = copy.deepcopy(unfused)
    Adapters(*unfused).load(path)
    Adapters(*fused).load(path, fuse=True)

    ids = reference.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_text = reference.text_encoder(ids)[0]
        expected = reference.unet(latents, 500, encoder_hidden_states=expected_text).sample
        outputs = {}
        for name, (unet, text_encoder) in (("unfused", unfused), ("fused", fused)):
            text = text_encoder(ids)[0]
            assert torch.allclose(text, expected_text, atol=1e-4), name
            outputs[name] = unet(latents, torch.tensor([500]), text)
    assert torch.allclose(outputs["unfused"], outputs["fused"], atol=1e-5)
    assert torch.allclose(outputs["fused"], expected, atol=1e-4)
    assert torch.allclose(outputs["unfused"], expected, atol=1e-4)


def test_kohya_and_peft_layouts_of_the_same_weights_agree(micro_by_family, tmp_path):
    """The same every-layer tensors in both layouts (peft's CLIP keys as transformers 5 names them, without
    text_model.) fuse to the same weights and give the same unfused output."""
    (by_family, tokenizer), base = micro_by_family, micro_by_family[0]["sd1"]
    pairs = every_layer_pairs(base["unet"], base["text_encoder"])
    assert any(part == "text_encoder" and not name.startswith("text_model.") for part, name in pairs)
    kohya = write_lora(tmp_path / "kohya.safetensors", pairs, "kohya", alpha=2.0)  # alpha = rank, peft's default
    peft = write_lora(tmp_path / "peft.safetensors", pairs, "peft")
    fused = {}
    for layout, path in (("kohya", kohya), ("peft", peft)):
        models = copy.deepcopy(base)
        Adapters(models["unet"], models["text_encoder"]).load(path, fuse=True)
        fused[layout] = {part: model.state_dict() for part, model in models.items()}
        unfused = copy.deepcopy(base)
        Adapters(unfused["unet"], unfused["text_encoder"]).load(path)
        for part in models:
            expected = part_output(models, part, tokenizer)
            assert torch.allclose(part_output(unfused, part, tokenizer), expected, atol=1e-5), (layout, part)
    for part, model in base.items():
        original = model.state_dict()
        assert all(torch.equal(fused["kohya"][part][key], fused["peft"][part][key]) for key in original)
        changed = [key for key, value in original.items() if not torch.equal(value, fused["peft"][part][key])]
        assert len(changed) == len(adaptable_modules(model)), part  # every weight, no bias


# One module of each kind, in micro U-Nets of two levels: attention at level 0 (32x32 at 32x32 latents),
# a downsampler, an upsampler from 16x16, 1x1 shortcuts in the up blocks; "sd2" projects with Linears.
LAYER_KINDS = {
    "self-attention q": ("sd1", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    "cross-attention k": ("sd1", "unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    "cross-attention v": ("sd1", "unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"),
    "attention out": ("sd1", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    "feed-forward GEGLU proj": ("sd1", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    "feed-forward out": ("sd1", "unet", "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"),
    "proj_in 1x1 conv": ("sd1", "unet", "down_blocks.0.attentions.0.proj_in"),
    "proj_out 1x1 conv": ("sd1", "unet", "mid_block.attentions.0.proj_out"),
    "proj_in Linear": ("sd2", "unet", "down_blocks.0.attentions.0.proj_in"),
    "proj_out Linear": ("sd2", "unet", "up_blocks.1.attentions.0.proj_out"),
    "ResNet conv1 3x3": ("sd1", "unet", "down_blocks.0.resnets.0.conv1"),
    "ResNet conv2 3x3": ("sd1", "unet", "up_blocks.0.resnets.1.conv2"),
    "shortcut 1x1 conv": ("sd1", "unet", "up_blocks.1.resnets.0.conv_shortcut"),
    "time embedding linear_1": ("sd1", "unet", "time_embedding.linear_1"),
    "time embedding linear_2": ("sd1", "unet", "time_embedding.linear_2"),
    "ResNet time_emb_proj": ("sd1", "unet", "mid_block.resnets.0.time_emb_proj"),
    "downsampler conv": ("sd1", "unet", "down_blocks.0.downsamplers.0.conv"),
    "upsampler conv": ("sd1", "unet", "up_blocks.0.upsamplers.0.conv"),
    "conv_in": ("sd1", "unet", "conv_in"),
    "conv_out": ("sd1", "unet", "conv_out"),
    "CLIP q_proj": ("sd1", "text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "CLIP out_proj": ("sd1", "text_encoder", "encoder.layers.1.self_attn.out_proj"),
    "CLIP fc1": ("sd1", "text_encoder", "encoder.layers.0.mlp.fc1"),
    "CLIP fc2": ("sd1", "text_encoder", "encoder.layers.1.mlp.fc2"),
}


@pytest.fixture(scope="module")
def micro_by_family():
    """``({family: {"unet": unet, "text_encoder": clip}}, tokenizer)``; "sd2" projects with Linears."""
    from ldm.models import UNet

    models = micro_models()
    by_family = {}
    for family, linear in (("sd1", False), ("sd2", True)):
        torch.manual_seed(0)
        unet = UNet(dataclasses.replace(LORA_UNET, use_linear_projection=linear)).eval()
        by_family[family] = {"unet": unet, "text_encoder": models.text_encoder}
    return by_family, models.tokenizer


def part_output(models, part, tokenizer):
    if part == "text_encoder":
        ids = tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return models["text_encoder"](ids)[0]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    with torch.no_grad():
        return models["unet"](latents, torch.tensor([500]), torch.randn(1, 77, 64, generator=generator))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_a_lora_on_one_layer_changes_the_output_fused_or_not(kind, micro_by_family, tmp_path, monkeypatch):
    """Each kind alone changes its network's output, unfused as fused. The U-Net's fast paths run at the
    32x32 latents used here: sub-pixel upsampling from 16x16 (its threshold lowered) and convs sliced in
    16 channels (see the 512px test for the real thresholds)."""
    from ldm.kernels import conv as conv_kernels

    monkeypatch.setattr(conv_kernels, "SUBPIXEL_MIN_PIXELS", 16 * 16)
    monkeypatch.setattr(conv_kernels, "SLICED_CONV_CHANNELS", 16)
    family, part, name = LAYER_KINDS[kind]
    by_family, tokenizer = micro_by_family
    base = by_family[family]
    pair = random_pair(adaptable_modules(base[part])[name], 2, torch.Generator().manual_seed(0))
    before = part_output(base, part, tokenizer)
    for layout in ("kohya", "peft"):
        path = write_lora(tmp_path / f"{layout}.safetensors", {(part, name): pair}, layout)
        unfused, fused = copy.deepcopy(base), copy.deepcopy(base)
        Adapters(unfused["unet"], unfused["text_encoder"]).load(path)
        Adapters(fused["unet"], fused["text_encoder"]).load(path, fuse=True)
        after = part_output(unfused, part, tokenizer)
        assert (after - before).abs().max() > 1e-3, layout
        assert torch.allclose(after, part_output(fused, part, tokenizer), atol=1e-5), layout


# --- Broken files and scales are refused before any model changes -------------------------------------------

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a (32, 32) Linear of the micro U-Net
DOWN, UP, ALPHA = f"{Q}.lora_down.weight", f"{Q}.lora_up.weight", f"{Q}.alpha"
PEFT_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
MISSING = "lora_unet_no_such_block_to_q"
GOOD = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1)}


def q_pair(down=(2, 32), up=(32, 2), **alpha):
    return {DOWN: torch.ones(down), UP: torch.ones(up), **{ALPHA: value for value in alpha.values()}}


def with_value(key, value):
    tensors = q_pair()
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    return tensors


# name: (tensors besides GOOD's valid module, error, message, the key it names)
BROKEN_FILES = {
    "ranks disagree": (q_pair(up=(32, 3)), CheckpointError, "has rank 3 but .* has rank 2", UP),
    "rank 0": (q_pair(down=(0, 32), up=(32, 0)), CheckpointError, "has rank 0", DOWN),
    "alpha of two numbers": (q_pair(alpha=torch.tensor([1.0, 2.0])), CheckpointError, "holds 2 values; alpha must be one number", ALPHA),
    "boolean alpha": (q_pair(alpha=torch.tensor(True)), CheckpointError, "torch.bool alpha", ALPHA),
    "infinite alpha": (q_pair(alpha=torch.tensor(float("inf"))), CheckpointError, "alpha = inf", ALPHA),
    "NaN alpha": (q_pair(alpha=torch.tensor(float("nan"))), CheckpointError, "alpha = nan", ALPHA),
    "NaN weight": (with_value(DOWN, float("nan")), CheckpointError, "NaN or infinite", DOWN),
    "infinite weight": (with_value(UP, float("-inf")), CheckpointError, "NaN or infinite", UP),
    "integer weight": ({**q_pair(), UP: torch.ones(32, 2, dtype=torch.int64)}, CheckpointError, "torch.int64 values", UP),
    "1-D weight": ({**q_pair(), DOWN: torch.ones(64)}, CheckpointError, "2-D or 4-D", DOWN),
    "no up weight": ({DOWN: torch.ones(2, 32)}, CheckpointError, "has no 'lora_up.weight' beside it, which LoRA needs", DOWN),
    "module does not exist": (
        {f"{MISSING}.lora_down.weight": torch.ones(2, 32), f"{MISSING}.lora_up.weight": torch.ones(32, 2)},
        CheckpointError, "does not exist in the unet", f"{MISSING}.lora_down.weight",
    ),
    "in features do not fit": (q_pair(down=(2, 48)), CheckpointError, r"do not fit the weight \(32, 32\)", DOWN),
    "out features do not fit": (q_pair(up=(48, 2)), CheckpointError, "do not fit the weight", DOWN),
    "3x3 LoRA on a Linear": (q_pair(down=(2, 32, 3, 3), up=(32, 2, 1, 1)), CheckpointError, "do not fit the weight", DOWN),
    "one module twice": ({**q_pair(), PEFT_Q: torch.ones(2, 32)}, CheckpointError, "adapts the same module as", PEFT_Q),
    "LoHa beside LoRA": ({**q_pair(), f"{Q}.hada_w1_a": torch.ones(2, 32)}, CheckpointError, "is a LoHa tensor beside LoRA tensors", f"{Q}.hada_w1_a"),
    "DoRA magnitude alone": (
        {"unet.conv_out.lora_magnitude_vector": torch.ones(4)},
        CheckpointError, r"has no adapter weights beside it \(only alpha or DoRA\)", "unet.conv_out.lora_magnitude_vector",
    ),
    "kind ldm does not know": ({**q_pair(), f"{Q}.oft_blocks": torch.ones(2, 32)}, CheckpointError, "is a OFT weight", f"{Q}.oft_blocks"),
    "tensor name ldm does not know": ({f"{Q}.lora_side.weight": torch.ones(2, 32)}, CheckpointError, "holds tensor 'lora_side.weight', a kind of adapter weight ldm does not know", f"{Q}.lora_side.weight"),
    "not a LoRA": ({"model.diffusion_model.out.2.weight": torch.ones(2)}, CheckpointError, "neither kohya", "model.diffusion_model.out.2.weight"),
}  # fmt: skip


@pytest.fixture(scope="module")
def micro_unet_and_clip():
    models = micro_models()
    return models.unet, models.text_encoder


@pytest.mark.parametrize("case", BROKEN_FILES)
def test_broken_files_are_one_line_errors_and_change_nothing(case, micro_unet_and_clip, tmp_path):
    tensors, error, message, key = BROKEN_FILES[case]
    path = tmp_path / "broken.safetensors"
    save_file({**GOOD, **tensors}, str(path))
    unet, text_encoder = micro_unet_and_clip
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    for fuse in (False, True):
        with pytest.raises(error, match=message) as raised:
            Adapters(unet, text_encoder).load(path, fuse=fuse)
        text = str(raised.value)
        assert "\n" not in text and str(path) in text and repr(key) in text
    # GOOD's valid module was neither fused nor wrapped: the file was refused as a whole.
    assert set(unet.state_dict()) == set(before)
    assert all(torch.equal(value, before[name]) for name, value in unet.state_dict().items())


def test_empty_file_and_folder_are_named_as_such(micro_unet_and_clip, tmp_path):
    unet, text_encoder = micro_unet_and_clip
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(CheckpointError, match=r"empty.safetensors holds no tensors; it is empty$"):
        Adapters(unet, text_encoder).load(tmp_path / "empty.safetensors")
    with pytest.raises(InputError, match="is a folder, not a LoRA file"):
        Adapters(unet, text_encoder).load(tmp_path)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_a_scale_that_is_not_finite_is_refused(scale, micro_unet_and_clip, lora_file):
    from ldm.pipeline import Pipeline

    path, _ = lora_file
    unet, text_encoder = micro_unet_and_clip
    for fuse in (False, True):
        with pytest.raises(InputError, match=f"the LoRA scale for .* must be a finite number, got {scale}"):
            Adapters(unet, text_encoder).load(path, scale=scale, fuse=fuse)
    models = micro_models()
    pipe = Pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer, models.scheduler_config)
    with pytest.raises(InputError, match="must be a finite number"):
        pipe.load_lora(path, scale=scale)
    with pytest.raises(InputError, match="must be a finite number"):
        parse_lora_argument(f"style.safetensors:{scale}")
    with pytest.raises(InputError, match="must be a number, got '0.8'"):
        Adapters(unet, text_encoder).load(path, scale="0.8")
