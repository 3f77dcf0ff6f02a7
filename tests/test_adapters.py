"""Adapter kinds beyond LoRA (LoCon's Tucker form, LoHa, LoKr, full and norm diffs, DoRA) and managing
adapters by name: each kind's patched weight against peft's layers on the same tensors or against the
closed form, in kohya layout (diffusers' and the original SD module names) and peft's; list, rescale and
drop restore exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_training_support import micro_models, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture
from torch import nn

from ldm.adapters import Adapters
from ldm.errors import CheckpointError, InputError

LINEAR = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # (32, 64): the DoRA axes differ
CONV = "down_blocks.0.resnets.0.conv1"  # 3x3, (32, 32), with a bias
BIASED_LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
NORM = "down_blocks.0.resnets.0.norm1"  # GroupNorm(32)
# diffusers' module name -> the original SD name of the same module in the micro U-Net (one layer per block).
ORIGINAL_NAMES = {
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.resnets.1.conv2": "output_blocks.3.0.out_layers.3",
    "time_embedding.linear_1": "time_embed.0",
    "conv_out": "out.2",
}


@pytest.fixture()
def unet():
    return micro_models().unet


def kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def peft_layer(module: nn.Module, config, seed: int = 0) -> nn.Module:
    """A peft adapter layer of ``config`` on a copy of ``module``, every adapter tensor random."""
    from peft import inject_adapter_in_model

    holder = inject_adapter_in_model(config, nn.ModuleDict({"m": copy.deepcopy(module)}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in holder["m"].named_parameters():
            if "base_layer" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + (1.0 if "magnitude" in name else 0.0))
    return holder["m"]


def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapter tensors by their peft name (``hada_w1_a``, ``lora_A``...)."""
    found = {}
    for name in layer.adapter_layer_names:
        if "default" in getattr(layer, name):
            value = getattr(layer, name)["default"]
            found[name] = (value if isinstance(value, torch.Tensor) else value.weight).detach().clone()
    return found


def lyco_configs():
    from peft import LoHaConfig, LoKrConfig

    target = {"target_modules": ["m"]}
    return {
        "LoHa linear": (LINEAR, LoHaConfig(r=2, alpha=3, **target), 3.0),
        "LoHa 3x3 conv": (CONV, LoHaConfig(r=2, alpha=3, **target), 3.0),
        "LoHa 3x3 Tucker": (CONV, LoHaConfig(r=2, alpha=3, use_effective_conv2d=True, **target), 3.0),
        "LoKr linear, low-rank w2": (LINEAR, LoKrConfig(r=2, alpha=3, **target), 3.0),
        "LoKr linear, both low rank": (LINEAR, LoKrConfig(r=1, alpha=3, decompose_both=True, **target), 3.0),
        "LoKr 3x3 conv, flat w2": (CONV, LoKrConfig(r=1, alpha=3, **target), 3.0),
        "LoKr 3x3 conv, Tucker w2": (CONV, LoKrConfig(r=1, alpha=3, use_effective_conv2d=True, **target), 3.0),
        # Both factors full: LyCORIS and ComfyUI scale by 1 whatever the file's alpha (peft: alpha/r = 1 here).
        "LoKr both full, alpha ignored": (LINEAR, LoKrConfig(r=8, alpha=8, **target), 5.0),
    }


@pytest.mark.parametrize("case", list(lyco_configs()))
@pytest.mark.parametrize("names", ["diffusers", "original SD"])
def test_loha_and_lokr_equal_peft_layers(case, names, unet, tmp_path):
    """A kohya/LyCORIS file holding a peft layer's tensors patches the weight to W + peft's get_delta_weight."""
    module_name, config, file_alpha = lyco_configs()[case]
    module = unet.get_submodule(module_name)
    layer = peft_layer(module, config)
    expected = module.weight + layer.get_delta_weight("default")
    key = kohya(ORIGINAL_NAMES[module_name] if names == "original SD" else module_name)
    tensors = {f"{key}.{name}": value for name, value in peft_tensors(layer).items()}
    save_file({**tensors, f"{key}.alpha": torch.tensor(file_alpha)}, str(tmp_path / "lyco.safetensors"))
    assert Adapters(unet).load(tmp_path / "lyco.safetensors") == "lyco"
    assert torch.allclose(module.weight, expected, atol=1e-5), (module.weight - expected).abs().max()


def test_peft_layout_loha_reads_alpha_as_rank(unet, tmp_path):
    from peft import LoHaConfig

    module = unet.get_submodule(CONV)
    layer = peft_layer(module, LoHaConfig(r=2, alpha=2, target_modules=["m"]))
    expected = module.weight + layer.get_delta_weight("default")
    save_file({f"unet.{CONV}.{name}": value for name, value in peft_tensors(layer).items()}, str(tmp_path / "loha.safetensors"))
    Adapters(unet).load(tmp_path / "loha.safetensors")
    assert torch.allclose(module.weight, expected, atol=1e-5)


@pytest.mark.parametrize("layout", ["peft", "kohya dora_scale"])
@pytest.mark.parametrize("module_name", [LINEAR, CONV])
def test_dora_equals_peft_merge(layout, module_name, unet, tmp_path):
    """DoRA on the output axis: peft's ``lora_magnitude_vector`` and LyCORIS's ``dora_scale`` of shape
    (out, 1, ...) give peft's merged weight m · (W + ΔW) / ||W + ΔW|| (Liu et al. 2024, eq. 5)."""
    from peft import LoraConfig

    module = unet.get_submodule(module_name)
    alpha = 2.0 if layout == "peft" else 3.0  # peft files carry no alpha: alpha = rank
    layer = peft_layer(module, LoraConfig(r=2, lora_alpha=alpha, use_dora=True, target_modules=["m"]))
    found = peft_tensors(layer)
    layer.merge()
    expected = layer.base_layer.weight
    if layout == "peft":
        tensors = {f"unet.{module_name}.lora_A.weight": found["lora_A"], f"unet.{module_name}.lora_B.weight": found["lora_B"],
                   f"unet.{module_name}.lora_magnitude_vector": found["lora_magnitude_vector"]}  # fmt: skip
    else:
        key = kohya(module_name)
        tensors = {f"{key}.lora_down.weight": found["lora_A"], f"{key}.lora_up.weight": found["lora_B"], f"{key}.alpha": torch.tensor(alpha),
                   f"{key}.dora_scale": found["lora_magnitude_vector"].reshape(-1, *[1] * (module.weight.dim() - 1))}  # fmt: skip
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    adapters = Adapters(unet)
    adapters.load(tmp_path / "dora.safetensors")
    assert adapters.list()[0].kinds == ("DoRA (LoRA)",)
    assert torch.allclose(module.weight, expected, atol=1e-5), (module.weight - expected).abs().max()


def test_dora_on_the_input_axis_and_at_a_scale(unet, tmp_path):
    """kohya's and LyCORIS's default ``dora_scale`` (1, in): the norm of each input column. At scale s the
    weight moves a fraction s of the way to the decomposed one (ComfyUI, AUTOMATIC1111)."""
    module = unet.get_submodule(LINEAR)
    original = module.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 64, generator=generator), torch.randn(32, 2, generator=generator) * 0.1
    magnitude = torch.rand(1, 64, generator=generator) + 0.5
    key = kohya(LINEAR)
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0),
               f"{key}.dora_scale": magnitude}, str(tmp_path / "dora.safetensors"))  # fmt: skip
    adapted = original + 0.5 * up @ down  # alpha / rank = 1/2
    decomposed = magnitude * adapted / adapted.norm(dim=0, keepdim=True)
    adapters = Adapters(unet)
    adapters.load(tmp_path / "dora.safetensors", scale=0.25)
    assert torch.allclose(module.weight, original + 0.25 * (decomposed - original), atol=1e-5)
    adapters.set_scale("dora", 1.0)
    assert torch.allclose(module.weight, decomposed, atol=1e-5)
    assert torch.allclose(module.weight.norm(dim=0), magnitude[0], atol=1e-5)


def test_tucker_locon_equals_its_three_convolutions(unet, tmp_path):
    """LoCon's Tucker form (``lora_mid``): the patched conv equals the 1x1 down, the kxk mid and the 1x1 up
    convolutions applied one after another, times alpha/rank."""
    module = unet.get_submodule(CONV)
    generator = torch.Generator().manual_seed(0)
    down, mid, up = (torch.randn(shape, generator=generator) * 0.2 for shape in ((3, 32, 1, 1), (3, 3, 3, 3), (32, 3, 1, 1)))
    key = kohya(ORIGINAL_NAMES[CONV])
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
               f"{key}.alpha": torch.tensor(6.0)}, str(tmp_path / "locon.safetensors"))  # fmt: skip
    x = torch.randn(1, 32, 8, 8, generator=generator)
    with torch.no_grad():
        expected = module(x) + 2.0 * F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)  # alpha / rank = 6/3
        Adapters(unet).load(tmp_path / "locon.safetensors")
        assert torch.allclose(module(x), expected, atol=1e-4)


def test_full_and_norm_diffs_add_to_weight_and_bias(unet, tmp_path):
    models = micro_models()
    generator = torch.Generator().manual_seed(0)
    linear, norm = unet.get_submodule(BIASED_LINEAR), unet.get_submodule(NORM)
    clip_norm = models.text_encoder.get_submodule("encoder.layers.0.layer_norm1")
    before = [t.detach().clone() for t in (linear.weight, linear.bias, norm.weight, norm.bias, clip_norm.weight, clip_norm.bias)]
    diffs = [torch.randn(t.shape, generator=generator) for t in before]
    te = "lora_te_text_model_encoder_layers_0_layer_norm1"
    tensors = dict(zip([f"{kohya(BIASED_LINEAR)}.diff", f"{kohya(BIASED_LINEAR)}.diff_b", f"{kohya(ORIGINAL_NAMES[NORM])}.w_norm",
                        f"{kohya(ORIGINAL_NAMES[NORM])}.b_norm", f"{te}.w_norm", f"{te}.b_norm"], diffs))  # fmt: skip
    save_file(tensors, str(tmp_path / "diff.safetensors"))
    adapters = Adapters(unet, models.text_encoder)
    adapters.load(tmp_path / "diff.safetensors", scale=0.5)
    assert adapters.list()[0].kinds == ("full diff", "norm diff") and adapters.list()[0].modules == 3
    after = (linear.weight, linear.bias, norm.weight, norm.bias, clip_norm.weight, clip_norm.bias)
    for old, new, diff in zip(before, after, diffs):
        assert torch.allclose(new, old + 0.5 * diff, atol=1e-6)


def lora_file(path, modules, seed, rank=2):
    unet = micro_models().unet
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        weight = unet.get_submodule(name).weight
        tensors[f"{kohya(name)}.lora_down.weight"] = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.2
        tensors[f"{kohya(name)}.lora_up.weight"] = torch.randn(weight.shape[0], rank, *[1] * (weight.dim() - 2), generator=generator) * 0.2
    save_file(tensors, str(path))
    return path


def unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500]), torch.randn(1, 77, 64, generator=generator))


def test_list_rescale_and_drop_are_exact(unet, tmp_path):
    """Two adapters on shared modules with their own scales: listing, rescaling and back (bit for bit),
    and dropping each (the original weights come back exactly)."""
    original, plain = weights(unet), unet_output(unet)
    first = lora_file(tmp_path / "style.safetensors", [LINEAR, CONV], seed=0)
    second = lora_file(tmp_path / "detail.safetensors", [CONV, BIASED_LINEAR], seed=1)
    adapters = Adapters(unet)
    assert adapters.load(first, scale=0.8) == "style" and adapters.load(second, scale=-0.5, name="more") == "more"
    assert [(a.name, a.scale, a.kinds, a.modules, a.fused) for a in adapters.list()] == [
        ("style", 0.8, ("LoRA",), 2, False), ("more", -0.5, ("LoRA",), 2, False),
    ]
    both, output = weights(unet), unet_output(unet)
    reference = copy.deepcopy(micro_models().unet)
    Adapters(reference).load(first, scale=0.8, fuse=True)
    Adapters(reference).load(second, scale=-0.5, fuse=True)
    assert torch.allclose(output, unet_output(reference), atol=1e-5)
    adapters.set_scale("style", 0.3)
    assert not torch.equal(unet_output(unet), output)
    adapters.set_scale("style", 0.8)
    assert torch.equal(unet_output(unet), output) and all(torch.equal(v, both[k]) for k, v in unet.state_dict().items())
    adapters.delete("style")
    assert [a.name for a in adapters.list()] == ["more"]
    assert torch.equal(unet.get_submodule(LINEAR).weight, original[f"{LINEAR}.weight"])  # only style changed it
    adapters.delete("more")
    assert all(torch.equal(value, original[name]) for name, value in unet.state_dict().items())
    assert torch.equal(unet_output(unet), plain)
    with pytest.raises(InputError, match="no adapter named 'more' is loaded"):
        adapters.delete("more")


def test_a_fused_adapter_stays_and_under_removable_ones(unet, tmp_path):
    first = lora_file(tmp_path / "style.safetensors", [LINEAR, CONV], seed=0)
    second = lora_file(tmp_path / "base.safetensors", [CONV], seed=1)
    adapters = Adapters(unet)
    adapters.load(first)
    adapters.load(second, fuse=True)  # merged into the kept original of CONV, under "style"
    expected = copy.deepcopy(micro_models().unet)
    Adapters(expected).load(second, fuse=True)
    without_style = weights(expected)
    with pytest.raises(InputError, match="adapter 'base' was fused into the weights, so ldm cannot drop it"):
        adapters.delete("base")
    with pytest.raises(InputError, match="cannot rescale it"):
        adapters.set_scale("base", 0.5)
    adapters.delete("style")
    assert all(torch.allclose(value, without_style[name], atol=1e-6) for name, value in unet.state_dict().items())
    with pytest.raises(InputError, match="an adapter named 'base' is already loaded"):
        adapters.load(second, name="base")


def test_pipeline_manages_adapters_and_metadata(tmp_path):
    from ldm.pipeline import Pipeline

    models = micro_models()
    pipe = Pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer, models.scheduler_config)
    original = weights(pipe.unet)
    path = lora_file(tmp_path / "style.safetensors", [LINEAR], seed=0)
    assert [pipe.load_lora(path, scale=0.8), pipe.load_lora(path)] == ["style", "style_2"]
    assert pipe.adapters == [("style", 0.8), ("style_2", 1.0)]
    pipe.set_adapter_scale("style_2", 0.5)
    assert pipe.adapters == [("style", 0.8), ("style_2", 0.5)]
    assert [info.path for info in pipe.lora_adapters()] == [path, path]
    pipe.delete_adapters("style")
    assert pipe.adapters == [("style_2", 0.5)]
    with pytest.raises(InputError, match="must be a finite number"):
        pipe.set_adapter_scale("style_2", float("nan"))
    pipe.load_lora(path, fuse=True, name="fused")
    pipe.unload_lora_weights()
    assert pipe.adapters == [("fused", 1.0)] and [info.fused for info in pipe.lora_adapters()] == [True]
    assert not torch.equal(pipe.unet.get_submodule(LINEAR).weight, original[f"{LINEAR}.weight"])


# name: (tensors, the key the error names, what it says)
BROKEN = {
    "LoKr without w2": ({f"{kohya(LINEAR)}.lokr_w1": torch.ones(4, 8)}, f"{kohya(LINEAR)}.lokr_w1", "has neither lokr_w2 and lokr_w2_a/_b"),
    "LoHa ranks disagree": (
        {f"{kohya(LINEAR)}.hada_w1_a": torch.ones(32, 2), f"{kohya(LINEAR)}.hada_w1_b": torch.ones(3, 64),
         f"{kohya(LINEAR)}.hada_w2_a": torch.ones(32, 2), f"{kohya(LINEAR)}.hada_w2_b": torch.ones(2, 64)},
        f"{kohya(LINEAR)}.hada_w1_a", "has rank 2 but .* has rank 3",
    ),
    "LoKr of the wrong size": (
        {f"{kohya(LINEAR)}.lokr_w1": torch.ones(4, 8), f"{kohya(LINEAR)}.lokr_w2": torch.ones(8, 4)},
        f"{kohya(LINEAR)}.lokr_w1", r"LoKr weights of shape \(32, 32\), which do not fit the weight \(32, 64\)",
    ),
    "norm diff on a Linear": (
        {f"{kohya(LINEAR)}.w_norm": torch.ones(32)}, f"{kohya(LINEAR)}.w_norm", "norm diff, which adapts a GroupNorm or LayerNorm, not a Linear",
    ),
    "diff_b without a bias": (
        {f"{kohya(LINEAR)}.diff": torch.ones(32, 64), f"{kohya(LINEAR)}.diff_b": torch.ones(32)},
        f"{kohya(LINEAR)}.diff", r"bias difference of shape \(32,\), but the bias is None",
    ),
    "DoRA magnitude of the wrong size": (
        {f"{kohya(LINEAR)}.lora_down.weight": torch.ones(2, 64), f"{kohya(LINEAR)}.lora_up.weight": torch.ones(32, 2),
         f"{kohya(LINEAR)}.dora_scale": torch.ones(1, 32)},
        f"{kohya(LINEAR)}.dora_scale", "no DoRA magnitude of the weight",
    ),
    "alpha beside a diff": ({f"{kohya(CONV)}.diff": torch.ones(32, 32, 3, 3), f"{kohya(CONV)}.alpha": torch.tensor(1.0)},
                            f"{kohya(CONV)}.alpha", "is beside a full diff, which takes no alpha"),
    "one module by both names": (
        {f"{kohya(CONV)}.diff": torch.ones(32, 32, 3, 3), f"{kohya(ORIGINAL_NAMES[CONV])}.diff": torch.ones(32, 32, 3, 3)},
        f"{kohya(CONV)}.diff", "adapts the same module as",
    ),
    "GLoRA": (
        {f"{kohya(LINEAR)}.a1.weight": torch.ones(2, 64)}, f"{kohya(LINEAR)}.a1.weight",
        r"is a GLoRA weight \('a1.weight'\), a kind of adapter ldm does not apply",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_broken_adapters_are_one_line_errors_and_change_nothing(case, unet, tmp_path):
    tensors, key, message = BROKEN[case]
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    before = weights(unet)
    with pytest.raises(CheckpointError, match=message) as raised:
        Adapters(unet).load(path)
    text = str(raised.value)
    assert "\n" not in text and str(path) in text and repr(key) in text
    assert all(torch.equal(value, before[name]) for name, value in unet.state_dict().items())


def test_peft_dora_file_gives_diffusers_unet_output(tmp_path):
    """A peft-layout DoRA file on a Linear and a 3x3 conv: ldm's U-Net equals diffusers' after ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline
    from tiny_models import save_diffusers_folder

    from ldm.loading import load_components

    folder = save_diffusers_folder(tmp_path / "model")
    ours = load_components(folder)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1"):
        weight = ours.unet.get_submodule(name).weight.detach()
        down = torch.randn(2, *weight.shape[1:], generator=generator) * 0.1
        up = torch.randn(weight.shape[0], 2, *[1] * (weight.dim() - 2), generator=generator) * 0.1
        norm = (weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)).flatten(1).norm(dim=1)
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = down, up
        magnitude = norm * (1 + 0.5 * torch.rand(norm.shape, generator=generator))
        # peft stores a conv's magnitude as (1, out, 1, 1), a Linear's as (out,)
        tensors[f"unet.{name}.lora_magnitude_vector"] = magnitude.reshape(1, -1, 1, 1) if weight.dim() == 4 else magnitude
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "dora.safetensors"))
    Adapters(ours.unet).load(tmp_path / "dora.safetensors")
    sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 64, generator=generator)
    with torch.no_grad():
        expected = pipe.unet(sample, 500, encoder_hidden_states=context).sample
        base = load_components(folder).unet(sample, torch.tensor([500]), context)
        got = ours.unet(sample, torch.tensor([500]), context)
    assert not torch.allclose(expected, base, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
