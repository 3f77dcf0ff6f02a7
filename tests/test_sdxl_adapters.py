"""SDXL adapters: LoRA files on SDXL's U-Net and both text encoders, in every layout diffusers reads for SDXL,
fuse to the weights diffusers' ``load_lora_weights`` + ``fuse_lora`` makes; every kind reaches all three
networks; LCM-LoRA SDXL's layout; a LoRA of the other family (SD 1.x/2.x or SDXL) is a one-line error before
any weight changes; SDXL embeddings (clip_l and clip_g) and which text encoder takes which file."""

from __future__ import annotations

import copy

import pytest
import tiny_sdxl
import torch
from safetensors.torch import save_file
from test_lora import adaptable_modules as adaptable, random_pair
from test_lora_layouts import LCM_MODULES
from test_training_support import micro_models, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.adapters import Adapters
from ldm.adapters.embeddings import Embeddings, WidthError, read_embedding
from ldm.errors import CheckpointError
from ldm.loading.keymap import unet_original_key
from ldm.models import UNet, UNetConfig

PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_TEXT = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    """The tiny random-weight diffusers StableDiffusionXLPipeline (copied for each file diffusers loads)."""
    return tiny_sdxl.pipeline("base")


def networks(pipe) -> dict[str, torch.nn.Module]:
    return {part: getattr(pipe, part) for part in PARTS}


def ldm_networks(pipe) -> dict[str, torch.nn.Module]:
    """ldm's SDXL U-Net with the reference's weights, and copies of its two text encoders (ldm runs transformers')."""
    unet = UNet(UNetConfig.from_diffusers(dict(pipe.unet.config))).eval()
    unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    return {"unet": unet, "text_encoder": copy.deepcopy(pipe.text_encoder), "text_encoder_2": copy.deepcopy(pipe.text_encoder_2)}


def random_pairs(models, rank=2, seed=0, skip=()):
    """{(part, module path): (down, up)} for every Linear and conv of ``models`` (kohya's shapes)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for part, model in models.items():
        for name, module in adaptable(model).items():
            if name.startswith(skip):
                continue
            pairs[part, name] = random_pair(module, rank, generator)
    return pairs


def clip_path(name: str) -> str:
    """kohya spells CLIP paths from text_model (transformers 4's nesting); bigG's projection sits beside it."""
    return name if name.startswith("text_model.") or name == "text_projection" else f"text_model.{name}"


def original_unet_name(name: str) -> str:
    """The SDXL original (sgm) name of a U-Net module: input_blocks / middle_block / output_blocks, label_emb..."""
    return unet_original_key(f"{name}.weight", 2, frozenset({0, 1})).removesuffix(".weight")


def kohya(original: bool):
    def keys(part, name):
        if part == "unet":
            key = "lora_unet_" + (original_unet_name(name) if original else name).replace(".", "_")
        else:
            key = KOHYA_TEXT[part] + clip_path(name).replace(".", "_")
        return f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"

    return keys


def suffixed(unet_ending: tuple[str, str], text_ending: tuple[str, str]):
    def keys(part, name):
        down, up = unet_ending if part == "unet" else text_ending
        return f"{part}.{name}{down}", f"{part}.{name}{up}", None

    return keys


PEFT = (".lora_A.weight", ".lora_B.weight")
# name: (key function, U-Net modules diffusers' loader does not place in that layout)
LAYOUTS = {
    "kohya, original U-Net names": (kohya(original=True), ()),
    # diffusers' kohya conversion turns add_embedding.linear_1 (in diffusers' spelling) into add.embedding.linear
    # and drops it; the original spelling (label_emb_0_0) above reaches it.
    "kohya, diffusers U-Net names": (kohya(original=False), ("add_embedding",)),
    "peft": (suffixed(PEFT, PEFT), ()),
    # diffusers 0.2x training scripts (train_dreambooth_lora_sdxl): .lora.down on the U-Net, lora_linear_layer on CLIP.
    "diffusers 0.2x": (suffixed((".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")), ()),
}  # fmt: skip


def write(path, pairs, keys, alpha=None):
    state = {}
    for (part, name), (down, up) in pairs.items():
        down_key, up_key, alpha_key = keys(part, name)
        state[down_key], state[up_key] = down, up
        if alpha_key is not None and alpha is not None:
            state[alpha_key] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def diffusers_fused(reference, path) -> dict[str, dict[str, torch.Tensor]]:
    pipe = copy.deepcopy(reference)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return {part: model.state_dict() for part, model in networks(pipe).items()}


def equal(model, state: dict, atol: float | None = None) -> bool:
    """Whether ``model``'s weights are ``state``'s: bit for bit, or within ``atol``."""
    now = model.state_dict()
    return all(torch.equal(now[k], v) if atol is None else torch.allclose(now[k], v, atol=atol) for k, v in state.items())


def changed_modules(before: dict, after: dict) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in before if not torch.equal(before[key], after[key])}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layer_fuses_as_diffusers_fuses_it(layout, reference, tmp_path):
    keys, skipped = LAYOUTS[layout]
    pairs = random_pairs(networks(reference), skip=skipped)
    alpha = 3.0 if layout.startswith("kohya") else None
    path = write(tmp_path / "sdxl.safetensors", pairs, keys, alpha)
    expected = diffusers_fused(reference, path)
    ours = ldm_networks(reference)
    Adapters(*ours.values()).load(path, fuse=True)
    for part in PARTS:
        original, got = networks(reference)[part].state_dict(), ours[part].state_dict()
        written = {name for p, name in pairs if p == part}
        assert written == {name for name in adaptable(ours[part]) if not name.startswith(skipped)}
        assert changed_modules(original, got) == written, part
        assert changed_modules(original, expected[part]) == written, part
        worst = max((got[key] - expected[part][key]).abs().max().item() for key in original)
        assert worst < TOLERANCE, (part, worst)


def test_the_layouts_cover_every_linear_and_conv_of_the_three_networks(reference):
    models = networks(reference)
    pairs = random_pairs(models)
    assert {part for part, _ in pairs} == set(PARTS)
    assert len(pairs) == sum(len(adaptable(model)) for model in models.values())
    assert ("text_encoder_2", "text_projection") in pairs and ("unet", "add_embedding.linear_1") in pairs


# --- every kind on the three networks ---------------------------------------------------------------------------

# (part, module, kind): a module of each network for each kind; U-Net keys in SDXL's original (sgm) names.
KIND_CASES = [
    ("unet", "down_blocks.2.attentions.0.transformer_blocks.2.attn2.to_k", "LoHa"),
    ("unet", "mid_block.attentions.0.transformer_blocks.1.ff.net.2", "LoKr"),
    ("unet", "up_blocks.0.attentions.1.proj_out", "full diff"),
    ("unet", "add_embedding.linear_2", "DoRA"),
    ("unet", "down_blocks.1.resnets.0.conv1", "LoCon"),
    ("unet", "up_blocks.1.resnets.2.norm1", "norm diff"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "LoHa"),
    ("text_encoder", "encoder.layers.1.mlp.fc1", "LoKr"),
    ("text_encoder", "encoder.layers.2.mlp.fc2", "full diff"),
    ("text_encoder", "encoder.layers.0.self_attn.out_proj", "DoRA"),
    ("text_encoder", "final_layer_norm", "norm diff"),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.v_proj", "LoHa"),
    ("text_encoder_2", "text_projection", "LoKr"),
    ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1", "full diff"),
    ("text_encoder_2", "text_model.encoder.layers.2.self_attn.k_proj", "DoRA"),
    ("text_encoder_2", "text_model.encoder.layers.1.layer_norm2", "norm diff"),
]


def kind_tensors(kind, module, generator):
    """(tensors by kohya name, the fused weight and bias they make from the module's) for one module of ``kind``."""
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    out, flat_in = weight.shape[0], weight[0].numel()
    if kind == "LoHa":  # alpha/r · (w1a @ w1b) ⊙ (w2a @ w2b), r = 2
        t = {"hada_w1_a": randn(out, 2), "hada_w1_b": randn(2, flat_in), "hada_w2_a": randn(out, 2), "hada_w2_b": randn(2, flat_in)}
        delta = 1.5 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return {**t, "alpha": torch.tensor(3.0)}, weight + delta.reshape(weight.shape), bias
    if kind == "LoKr":  # both factors full: w1 ⊗ w2, alpha ignored
        t = {"lokr_w1": randn(2, 2), "lokr_w2": randn(out // 2, flat_in // 2)}
        return {**t, "alpha": torch.tensor(7.0)}, weight + torch.kron(t["lokr_w1"], t["lokr_w2"]), bias
    if kind in ("full diff", "norm diff"):
        names = ("diff", "diff_b") if kind == "full diff" else ("w_norm", "b_norm")
        t = {names[0]: randn(*weight.shape), **({names[1]: randn(*bias.shape)} if bias is not None else {})}
        return t, weight + t[names[0]], None if bias is None else bias + t[names[1]]
    down = randn(2, *weight.shape[1:]) if kind == "LoCon" else randn(2, flat_in)
    up = randn(out, 2, 1, 1) if kind == "LoCon" else randn(out, 2)
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    if kind == "LoCon":
        return {"lora_down.weight": down, "lora_up.weight": up}, weight + delta, bias
    # DoRA, LyCORIS's dora_scale on the output axis: m · V / ||V|| per row, V = W + ΔW (eps as LyCORIS adds it)
    magnitude = torch.rand(out, 1, generator=generator) + 0.5
    adapted = weight + delta
    norm = adapted.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    return {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": magnitude}, magnitude * adapted / norm, bias


def test_every_kind_reaches_the_three_networks(reference, tmp_path):
    ours = ldm_networks(reference)
    generator = torch.Generator().manual_seed(3)
    state, expected = {}, {}
    for part, name, kind in KIND_CASES:
        module = ours[part].get_submodule(name)
        tensors, weight, bias = kind_tensors(kind, module, generator)
        prefix = kohya(original=True)(part, name)[0].removesuffix(".lora_down.weight")
        state.update({f"{prefix}.{tensor}": value for tensor, value in tensors.items()})
        expected[part, name] = (weight, bias)
    save_file(state, str(tmp_path / "kinds.safetensors"))
    adapters = Adapters(*ours.values())
    adapters.load(tmp_path / "kinds.safetensors", fuse=True)
    assert set(adapters.list()[0].kinds) == {"LoRA", "LoHa", "LoKr", "full diff", "norm diff", "DoRA (LoRA)"}
    for (part, name), (weight, bias) in expected.items():
        module = ours[part].get_submodule(name)
        assert (module.weight - weight).abs().max() < TOLERANCE, (part, name)
        if bias is not None:
            assert (module.bias - bias).abs().max() < TOLERANCE, (part, name)


def test_rescale_and_drop_are_exact_on_the_three_networks(reference, tmp_path):
    ours = ldm_networks(reference)
    originals = {part: copy.deepcopy(model.state_dict()) for part, model in ours.items()}
    path = write(tmp_path / "style.safetensors", random_pairs(ours), kohya(original=True), alpha=2.0)
    full = ldm_networks(reference)
    Adapters(*full.values()).load(path, fuse=True)
    adapters = Adapters(*ours.values())
    adapters.load(path, scale=0.5, text_encoder_scale=0.25)
    assert adapters.list()[0].modules == sum(len(adaptable(model)) for model in ours.values())
    key = "text_projection.weight"  # the second text encoder takes the text-encoder scale
    delta = full["text_encoder_2"].state_dict()[key] - originals["text_encoder_2"][key]
    assert torch.allclose(ours["text_encoder_2"].state_dict()[key], originals["text_encoder_2"][key] + 0.25 * delta, atol=1e-6)
    unet_key = "add_embedding.linear_1.weight"
    unet_delta = full["unet"].state_dict()[unet_key] - originals["unet"][unet_key]
    assert torch.allclose(ours["unet"].state_dict()[unet_key], originals["unet"][unet_key] + 0.5 * unet_delta, atol=1e-6)
    adapters.set_scale("style", 1.0)
    assert all(equal(ours[part], full[part].state_dict(), atol=1e-5) for part in PARTS)
    adapters.delete("style")
    assert all(equal(ours[part], originals[part]) for part in PARTS)


def test_a_refiner_has_only_the_second_text_encoder(reference, tmp_path):
    ours = ldm_networks(reference)
    pairs = {key: pair for key, pair in random_pairs(ours).items() if key[0] != "text_encoder"}
    path = write(tmp_path / "refiner.safetensors", pairs, kohya(original=True))
    before = copy.deepcopy(ours["text_encoder_2"].state_dict())
    Adapters(ours["unet"], None, ours["text_encoder_2"]).load(path)
    assert changed_modules(before, ours["text_encoder_2"].state_dict()) == set(adaptable(ours["text_encoder_2"]))
    both = write(tmp_path / "base.safetensors", random_pairs(ours), kohya(original=True))
    with pytest.raises(Exception, match=r"adapts the text encoder \(key 'lora_te1_.*'\) but the model given has none"):
        Adapters(ours["unet"], None, ours["text_encoder_2"]).load(both)


# --- LCM-LoRA SDXL ------------------------------------------------------------------------------------------------



def test_lcm_lora_sdxl_layout_fuses_as_diffusers_fuses_it(reference, tmp_path):
    """latent-consistency/lcm-lora-sdxl's layout, as its byte size shows (scripts/lcm_lora_layout.py): kohya
    keys with diffusers' module names on the U-Net alone (attention, feed-forward, transformer projections,
    ResNets, resamplers), fp16 down, up and alpha; alpha other than the rank scales the update."""
    unet_pairs = random_pairs({"unet": reference.unet}, rank=4, seed=5)
    pairs = {key: pair for key, pair in unet_pairs.items() if key[1].endswith(LCM_MODULES)}
    keys = kohya(original=False)
    state = {}
    for (part, name), (down, up) in pairs.items():
        down_key, up_key, alpha_key = keys(part, name)
        state[down_key], state[up_key] = down.half(), up.half()
        state[alpha_key] = torch.tensor(6.0, dtype=torch.float16)
    assert any("_downsamplers_0_conv." in key for key in state) and any("_time_emb_proj." in key for key in state)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))
    expected = diffusers_fused(reference, path)
    ours = ldm_networks(reference)
    Adapters(*ours.values()).load(path, fuse=True)
    original = reference.unet.state_dict()
    assert changed_modules(original, ours["unet"].state_dict()) == {name for _, name in pairs}
    got = ours["unet"].state_dict()
    assert max((got[k] - expected["unet"][k]).abs().max().item() for k in original) < TOLERANCE
    assert all(equal(ours[part], networks(reference)[part].state_dict()) for part in ("text_encoder", "text_encoder_2"))


# --- the other family's LoRA ------------------------------------------------------------------------------------


def sd_lora(path):
    """A kohya LoRA on every Linear and conv of the micro SD 1.x U-Net and CLIP (lora_unet_, lora_te_)."""
    from test_lora import kohya_key

    micro = micro_models()
    state = {}
    for (part, name), (down, up) in random_pairs({"unet": micro.unet, "text_encoder": micro.text_encoder}).items():
        state[f"{kohya_key(part, name)}.lora_down.weight"], state[f"{kohya_key(part, name)}.lora_up.weight"] = down, up
    save_file(state, str(path))
    return path


def one_module(path, key, down_width, out):
    save_file({f"{key}.lora_down.weight": torch.ones(2, down_width), f"{key}.lora_up.weight": torch.ones(out, 2)}, str(path))
    return path


def refused(models, path, message):
    before = {part: copy.deepcopy(model.state_dict()) for part, model in models.items() if model is not None}
    for fuse in (False, True):
        with pytest.raises(CheckpointError, match=message) as raised:
            Adapters(*models.values()).load(path, fuse=fuse)
        assert "\n" not in str(raised.value) and str(path) in str(raised.value)
    assert all(equal(models[part], state) for part, state in before.items())


def test_an_sd_lora_on_sdxl_is_a_one_line_error_before_any_weight_changes(reference, tmp_path):
    ours = ldm_networks(reference)
    sd_to_sdxl = "this LoRA is for SD 1.x/2.x, the model is SDXL"
    refused(ours, sd_lora(tmp_path / "sd.safetensors"), rf"{sd_to_sdxl} \(key 'lora_unet_down_blocks_0_attentions_0_.*outermost level")
    # From the shapes alone: a cross-attention reading SD 1.x's 768-wide text, on a module both families have.
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    refused(ours, one_module(tmp_path / "wide.safetensors", key, 768, 128), rf"{sd_to_sdxl} \(key '{key}.*768 wide \(SD 1.x's\)")


def test_an_sdxl_lora_on_sd_is_a_one_line_error_before_any_weight_changes(reference, tmp_path):
    micro = micro_models()
    models = {"unet": micro.unet, "text_encoder": micro.text_encoder}
    sdxl_to_sd = "this LoRA is for SDXL, the model is SD 1.x/2.x"
    path = write(tmp_path / "xl.safetensors", random_pairs(networks(reference)), kohya(original=True), alpha=2.0)
    refused(models, path, rf"{sdxl_to_sd} \(key '.*'")
    unet_only = {key: pair for key, pair in random_pairs(networks(reference)).items() if key[0] == "unet"}
    path = write(tmp_path / "xl_unet.safetensors", unet_only, kohya(original=False))
    refused(models, path, rf"{sdxl_to_sd} \(key 'lora_unet_.*(added conditioning|second or later transformer block)")
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    refused(models, one_module(tmp_path / "wide.safetensors", key, 2048, 32), rf"{sdxl_to_sd} \(key '{key}.*2048 wide \(SDXL's\)")
    te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    refused(models, one_module(tmp_path / "te2.safetensors", te2, 64, 64), rf"{sdxl_to_sd} \(key '{te2}.*second text encoder")


def test_the_pipeline_routes_loras_and_tags_to_the_second_text_encoder(reference, tmp_path):
    from tiny_models import ldm_pipeline

    from ldm.adapters.folder import PromptLora
    from ldm.prompts import LoraTag

    source = copy.deepcopy(reference)
    pipe = ldm_pipeline(source)
    pipe.text_encoder_2 = source.text_encoder_2
    original = copy.deepcopy(pipe.text_encoder_2.state_dict())
    path = write(tmp_path / "style.safetensors", random_pairs(ldm_networks(reference)), kohya(original=True), alpha=2.0)
    assert pipe.load_lora(path, scale=0.5) == "style"
    assert changed_modules(original, pipe.text_encoder_2.state_dict()) == set(adaptable(pipe.text_encoder_2))
    pipe.delete_adapters("style")
    assert equal(pipe.text_encoder_2, original)
    # <lora:style:0.3:1>: the TE multiplier scales both text encoders
    pipe.set_prompt_loras((PromptLora(LoraTag("style", 0.3, 1.0, "<lora:style:0.3:1>"), path, "0" * 12),))
    fused = ldm_networks(reference)
    Adapters(*fused.values()).load(path, scale=1.0, text_encoder_scale=0.3, fuse=True)
    assert equal(pipe.text_encoder_2, fused["text_encoder_2"].state_dict(), atol=1e-5)
    assert equal(pipe.unet, fused["unet"].state_dict(), atol=1e-5)
    pipe.set_prompt_loras(())
    assert equal(pipe.text_encoder_2, original)


# --- SDXL embeddings -------------------------------------------------------------------------------------------


def vectors(count, width, seed):
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def test_an_sdxl_embedding_gives_each_text_encoder_its_vectors(reference, tmp_path):
    clip_l, clip_g = vectors(2, tiny_sdxl.CLIP_L_WIDTH, 1), vectors(2, tiny_sdxl.BIGG_WIDTH, 2)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xlstyle.safetensors"))
    embedding = read_embedding(tmp_path / "xlstyle.safetensors")
    assert torch.equal(embedding.vectors_for("clip_l"), clip_l) and torch.equal(embedding.vectors_for("clip_g"), clip_g)
    assert (embedding.count, embedding.width, embedding.family) == (2, tiny_sdxl.CLIP_L_WIDTH + tiny_sdxl.BIGG_WIDTH, "SDXL")  # A1111's shape
    ours = ldm_networks(reference)
    for part, encoder, expected in (("text_encoder", "clip_l", clip_l), ("text_encoder_2", "clip_g", clip_g)):
        embeddings = Embeddings(ours[part], reference.tokenizer, encoder=encoder)
        assert embeddings.load(tmp_path / "xlstyle.safetensors") == ["xlstyle"]
        (word,) = embeddings.words()
        table = ours[part].get_input_embeddings().weight
        assert torch.equal(table[list(word.ids)], expected), encoder
    with pytest.raises(WidthError, match=r"is for SDXL \(clip_l and clip_g vectors\); this model is SD 1.x/2.x"):
        embedding.vectors_for(None)


def test_an_embedding_of_the_other_family_is_skipped_with_the_reason(reference, tmp_path):
    sd = tmp_path / "sdstyle.pt"  # A1111's SD 1.x file, as wide as SDXL's first text encoder
    torch.save({"string_to_param": {"*": vectors(1, tiny_sdxl.CLIP_L_WIDTH, 3)}}, sd)
    xl = tmp_path / "xlstyle.safetensors"
    save_file({"clip_l": vectors(1, tiny_sdxl.CLIP_L_WIDTH, 4), "clip_g": vectors(1, tiny_sdxl.BIGG_WIDTH, 5)}, str(xl))
    ours = ldm_networks(reference)
    sdxl_first = Embeddings(ours["text_encoder"], reference.tokenizer, encoder="clip_l")
    with pytest.raises(WidthError, match=rf"^embedding {sd} is for SD 1.x/2.x \(one set of vectors\); this model is SDXL"):
        sdxl_first.load(sd)
    with pytest.warns(UserWarning, match="embedding skipped"):
        assert sdxl_first.load(tmp_path) == ["xlstyle"]
    assert set(sdxl_first.skipped) == {"sdstyle"} and sdxl_first.skipped["sdstyle"].embedding.family == "SD 1.x/2.x"
    sd_model = Embeddings(copy.deepcopy(reference.text_encoder), reference.tokenizer)  # an SD 1.x encoder of the same width
    with pytest.warns(UserWarning, match=r"is for SDXL \(clip_l and clip_g vectors\); this model is SD 1.x/2.x"):
        assert sd_model.load(tmp_path) == ["sdstyle"]
    narrow = tmp_path / "narrow" / "narrow.safetensors"
    narrow.parent.mkdir()
    save_file({"clip_l": vectors(1, tiny_sdxl.CLIP_L_WIDTH, 6), "clip_g": vectors(1, 96, 7)}, str(narrow))
    with pytest.raises(WidthError, match=r"has clip_g vectors of width 96; this model's text encoder takes 128"):
        Embeddings(ours["text_encoder_2"], reference.tokenizer, encoder="clip_g").load(narrow)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"clip_l": torch.ones(2, 64), "clip_g": torch.ones(1, 128)}, "has 2 clip_l vectors but 1 clip_g; they must be as many"),
        ({"clip_l": torch.ones(1, 64)}, "has clip_l vectors but no clip_g; an SDXL embedding needs both"),
        ({"clip_l": torch.ones(1, 64), "clip_g": torch.full((1, 128), float("nan"))}, r"its vectors \(clip_g\) are not finite"),
    ],
)
def test_broken_sdxl_embeddings_are_one_line_errors(tensors, message, tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=message):
        read_embedding(path)
