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


def adaptable(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def random_pairs(models, rank=2, seed=0, skip=()):
    """{(part, module path): (down, up)} for every Linear and conv of ``models`` (kohya's shapes)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for part, model in models.items():
        for name, module in adaptable(model).items():
            if name.startswith(skip):
                continue
            if isinstance(module, torch.nn.Conv2d):
                down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
                up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
            else:
                down = torch.randn(rank, module.in_features, generator=generator)
                up = torch.randn(module.out_features, rank, generator=generator)
            pairs[part, name] = (down * 0.2, up * 0.2)
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
