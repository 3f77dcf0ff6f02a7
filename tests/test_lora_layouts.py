"""LoRA files in every layout diffusers reads for SD 1.x (kohya, peft, diffusers 0.2x ``.lora.down``,
``lora_linear_layer``, diffusers 0.1x attention processors) and the published LCM-LoRA file's (kohya keys
with diffusers' module names, fp16, an alpha per module): ldm reads each as diffusers does, on every Linear
and conv, fused and unfused; a key ldm cannot place is a one-line error naming it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import adaptable_modules, every_layer_pairs, kohya_key
from test_training_support import micro_models, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.errors import CheckpointError
from ldm.adapters import Adapters

# diffusers 0.1x attention processors: the projection's processor name, per network.
PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"},
    "text_encoder": {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"},
}


def suffixed(down: str, up: str):
    """Keys ``<part>.<module><down>`` / ``<up>``: diffusers' layouts but the processors'."""
    return lambda part, name: (f"{part}.{name}{down}", f"{part}.{name}{up}")


def kohya(part, name):
    key = kohya_key(part, name)
    return f"{key}.lora_down.weight", f"{key}.lora_up.weight"


PEFT = suffixed(".lora_A.weight", ".lora_B.weight")
LORA_DOWN = suffixed(".lora.down.weight", ".lora.up.weight")
LINEAR_LAYER = suffixed(".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")


def processors(segment: str, others):
    """Attention projections as ``<attention><segment>.to_q_lora.down.weight``, other modules by ``others``."""

    def keys(part, name):
        for projection, processor in PROCESSOR_NAMES[part].items():
            if name.endswith("." + projection):
                attention = name[: -len(projection) - 1]
                return f"{part}.{attention}{segment}.{processor}.down.weight", f"{part}.{attention}{segment}.{processor}.up.weight"
        return others(part, name)

    return keys


# name: ({part: key function}, whether diffusers' load_lora_weights reads it)
LAYOUTS = {
    "kohya": ({"unet": kohya, "text_encoder": kohya}, True),
    "peft": ({"unet": PEFT, "text_encoder": PEFT}, True),
    # diffusers 0.2x training scripts.
    "diffusers 0.2x": ({"unet": LORA_DOWN, "text_encoder": LINEAR_LAYER}, True),
    # diffusers 0.1x attention processors, as diffusers itself converts kohya files.
    "attention processors": (
        {"unet": processors(".processor", LORA_DOWN), "text_encoder": processors("", LINEAR_LAYER)}, True,
    ),
    # Unambiguous spellings that diffusers' loader skips or refuses: ldm reads them all the same.
    "text encoder .lora.down": ({"unet": LORA_DOWN, "text_encoder": LORA_DOWN}, False),
    "U-Net lora_linear_layer": ({"unet": LINEAR_LAYER, "text_encoder": PEFT}, False),
    "processors without .processor": (
        {"unet": processors("", LORA_DOWN), "text_encoder": processors(".processor", PEFT)}, False,
    ),
}  # fmt: skip
DIFFUSERS_LAYOUTS = [name for name, (_, read_by_diffusers) in LAYOUTS.items() if read_by_diffusers]
PROMPT = "a photo of a red cat"
REFERENCE_CALL = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np")  # LCM-LoRA runs unguided


def write_layout(path, pairs, layout):
    """``pairs`` = {(part, module path): (down, up)} written in ``layout`` (alpha = rank where one is written)."""
    key_functions, _ = LAYOUTS[layout]
    state = {}
    for (part, name), (down, up) in pairs.items():
        down_key, up_key = key_functions[part](part, name)
        state[down_key], state[up_key] = down, up
        if layout == "kohya":
            state[down_key.replace("lora_down.weight", "alpha")] = torch.tensor(float(down.shape[0]))
    assert len(state) == len(pairs) * (3 if layout == "kohya" else 2)
    save_file(state, str(path))
    return path


def test_every_layout_fuses_to_the_same_weights(tmp_path):
    base = micro_models()
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    pairs = every_layer_pairs(models["unet"], models["text_encoder"])
    fused = {}
    for number, layout in enumerate(LAYOUTS):
        copies = copy.deepcopy(models)
        Adapters(copies["unet"], copies["text_encoder"]).load(write_layout(tmp_path / f"{number}.safetensors", pairs, layout), fuse=True)
        fused[layout] = {part: model.state_dict() for part, model in copies.items()}
    for part, model in models.items():
        original = model.state_dict()
        changed = [key for key, value in original.items() if not torch.equal(value, fused["kohya"][part][key])]
        assert len(changed) == len(adaptable_modules(model)), part
        for layout in LAYOUTS:
            assert all(torch.equal(fused[layout][part][key], fused["kohya"][part][key]) for key in original), (layout, part)


@pytest.fixture(scope="module")
def lcm_reference():
    """The tiny SD pipeline sampling with diffusers' LCMScheduler, as LCM-LoRA is used."""
    from diffusers import LCMScheduler
    from tiny_models import diffusers_pipeline

    reference = diffusers_pipeline("sd1")
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    return reference


def assert_lcm_images_equal_diffusers(lcm_reference, make_file):
    """ldm's LCM images with the LoRA file ``make_file(unet, text_encoder)`` writes, unfused and fused, equal
    diffusers' after ``load_lora_weights``, at guidance 1 (as LCM-LoRA is run)."""
    from diffusers import LCMScheduler
    from tiny_models import ldm_pipeline

    reference = copy.deepcopy(lcm_reference)
    ours = {"unfused": ldm_pipeline(reference), "fused": ldm_pipeline(reference)}
    for pipe in ours.values():
        pipe.text_encoder = copy.deepcopy(pipe.text_encoder)  # ldm_pipeline shares the reference's
    path = make_file(ours["fused"].unet, ours["fused"].text_encoder)
    before = reference(PROMPT, **REFERENCE_CALL, generator=torch.Generator().manual_seed(0)).images
    reference.load_lora_weights(str(path))
    expected = reference(PROMPT, **REFERENCE_CALL, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(expected - before).max() > 1e-2
    for mode, pipe in ours.items():
        pipe.load_lora(path, fuse=mode == "fused")
        scheduler = LCMScheduler.from_config(reference.scheduler.config)
        got = pipe(PROMPT, **REFERENCE_CALL, seed=0, scheduler=scheduler).images
        assert np.abs(got - expected).max() < 1e-4, mode


@pytest.mark.parametrize("layout", DIFFUSERS_LAYOUTS)
def test_lcm_lora_images_equal_diffusers_in_every_layout(layout, lcm_reference, tmp_path):
    """A random LoRA on every Linear and conv of the U-Net and CLIP in ``layout``."""
    def make(unet, text_encoder):
        return write_layout(tmp_path / "lcm-lora.safetensors", every_layer_pairs(unet, text_encoder), layout)

    assert_lcm_images_equal_diffusers(lcm_reference, make)


# The U-Net modules LCM-LoRA adapts (diffusers' train_lcm_distill_lora_* target modules).
LCM_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
               "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")  # fmt: skip


def write_published_lcm_layout(path, pairs, alpha: float):
    """lcm-lora-sdv1-5's layout, as its byte size shows (scripts/lcm_lora_layout.py): kohya keys with diffusers'
    module names, the U-Net's LCM modules alone, fp16 down, up and alpha, ``{"format": "pt"}`` metadata."""
    state = {}
    for (part, name), (down, up) in pairs.items():
        if part == "unet" and name.endswith(LCM_MODULES):
            key = kohya_key(part, name)
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down.half(), up.half()
            state[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    assert any(key.startswith("lora_unet_down_blocks_0_downsamplers_0_conv") for key in state)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def test_the_published_lcm_lora_layout_gives_diffusers_images(lcm_reference, tmp_path):
    """fp16 tensors and an fp16 alpha other than the rank (it scales the update by alpha / rank)."""
    def make(unet, text_encoder):
        pairs = every_layer_pairs(unet, text_encoder)
        return write_published_lcm_layout(tmp_path / "pytorch_lora_weights.safetensors", pairs, alpha=3.0)

    assert_lcm_images_equal_diffusers(lcm_reference, make)


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # an attention of the micro U-Net
# name: (the key, with a valid module beside it, and what the error says)
UNPLACEABLE = {
    "no such module": ("unet.no_such_block.lora.down.weight", "does not exist in the unet"),
    "no such processor": (f"unet.{Q}.processor.to_x_lora.down.weight", "has ending 'down.weight', a kind of adapter weight ldm does not know"),
    "alpha in a diffusers layout": (f"unet.{Q}.to_q.alpha", "is an alpha in a diffusers/peft layout, which diffusers does not read"),
    "processor key without a prefix": (f"{Q}.processor.to_q_lora.down.weight", "neither kohya"),
    "LoHa beside LoRA": (f"unet.{Q}.to_q.hada_w1_a", "is a LoHa tensor beside LoRA tensors; a module takes one kind of adapter"),
    "DoRA without an update": ("lora_unet_conv_in.dora_scale", "has no adapter weights beside it"),
    "OFT": ("lora_unet_conv_in.oft_blocks", "is a OFT weight"),
    # on this SD 1.x model (tests/test_sdxl_adapters.py loads such files on SDXL)
    "SDXL's second text encoder": ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora.down.weight", "this LoRA is for SDXL, the model is SD 1.x/2.x"),
}


@pytest.mark.parametrize("case", UNPLACEABLE)
def test_an_unplaceable_key_is_a_one_line_error_naming_it(case, tmp_path):
    key, message = UNPLACEABLE[case]
    models = micro_models()
    good = {f"unet.{Q}.to_q.lora.down.weight": torch.ones(2, 32), f"unet.{Q}.to_q.lora.up.weight": torch.ones(32, 2)}
    tensors = {**good, key: torch.ones(2, 32)}
    if key.endswith(".lora.down.weight"):
        tensors[key.replace(".lora.down.", ".lora.up.")] = torch.ones(32, 2)
    path = tmp_path / "unplaceable.safetensors"
    save_file(tensors, str(path))
    before = {name: value.clone() for name, value in models.unet.state_dict().items()}
    for fuse in (False, True):
        with pytest.raises(CheckpointError, match=message) as raised:
            Adapters(models.unet, models.text_encoder).load(path, fuse=fuse)
        text = str(raised.value)
        assert "\n" not in text and str(path) in text and repr(key) in text
    assert all(torch.equal(value, before[name]) for name, value in models.unet.state_dict().items())


def test_the_cli_refuses_an_unplaceable_lcm_lora_before_generating(tmp_path, capsys):
    from test_training_support import save_micro_model

    from ldm.cli import main

    model = save_micro_model(tmp_path / "model")
    path = tmp_path / "lcm-lora.safetensors"
    key = "unet.down_blocks.5.resnets.0.conv1.lora.down.weight"
    save_file({key: torch.ones(2, 32, 3, 3), key.replace(".down.", ".up."): torch.ones(32, 2, 1, 1)}, str(path))
    out = tmp_path / "out"
    argv = ["txt2img", "a cat", "--model", str(model), "--lora", str(path), "--steps", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"ldm txt2img: error: {path}: key '{key}' is for a module that does not exist in the unet" in err
    assert not out.exists()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_peft_file_scales_by_the_lora_config_in_its_metadata(use_rslora, lcm_reference, tmp_path):
    """diffusers' ``save_lora_weights`` keeps peft's LoraConfig (r, lora_alpha, alpha_pattern, rank_pattern,
    use_rslora) in the file's metadata, not as alpha tensors; ldm scales each module as diffusers does."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tiny_models import ldm_pipeline

    trained = copy.deepcopy(lcm_reference)
    config = LoraConfig(
        r=4, lora_alpha=12, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"], use_rslora=use_rslora,
        rank_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2}, alpha_pattern={"to_v": 3},
    )
    trained.unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in trained.unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet),
        unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict(), safe_serialization=True,
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    reference = copy.deepcopy(lcm_reference)
    pipe = ldm_pipeline(reference)
    reference.load_lora_weights(str(path))
    expected = reference(PROMPT, **REFERENCE_CALL, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora(path, fuse=True)
    from diffusers import LCMScheduler

    got = pipe(PROMPT, **REFERENCE_CALL, seed=0, scheduler=LCMScheduler.from_config(reference.scheduler.config)).images
    assert np.abs(got - expected).max() < 1e-4
    unscaled = ldm_pipeline(copy.deepcopy(lcm_reference))
    save_file(load_file(str(path)), str(tmp_path / "no-metadata.safetensors"))  # the same tensors, alpha = r
    unscaled.load_lora(tmp_path / "no-metadata.safetensors", fuse=True)
    plain = unscaled(PROMPT, **REFERENCE_CALL, seed=0, scheduler=LCMScheduler.from_config(reference.scheduler.config)).images
    assert np.abs(plain - expected).max() > 1e-3


@pytest.mark.parametrize(
    "metadata, message",
    [("{not json", "is not JSON"), ('{"unet.r": "four", "unet.lora_alpha": 4}', "rank or alpha as something other than positive numbers"),
     ('{"unet.r": 4, "unet.alpha_pattern": {"to_q": -1}}', "rank or alpha"), ('{"unet.use_rslora": "yes"}', "use_rslora")],
)
def test_broken_lora_adapter_metadata_is_a_one_line_error(metadata, message, tmp_path):
    from ldm.adapters.files import read_adapter

    path = tmp_path / "broken.safetensors"
    q = f"unet.{Q}.to_q"
    save_file({f"{q}.lora_A.weight": torch.ones(2, 4), f"{q}.lora_B.weight": torch.ones(4, 2)}, str(path), metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(CheckpointError, match=message) as raised:
        read_adapter(path)
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)
