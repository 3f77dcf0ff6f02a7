"""Where each tensor of an adapter file goes: its network, its module and its tensor name.

Two families of layouts name the same modules:

- **kohya / LyCORIS** ``lora_unet_<module>.<tensor>``, ``lora_te_<module>.<tensor>`` (SDXL's text
  encoders: ``lora_te1_`` CLIP ViT-L, ``lora_te2_`` OpenCLIP bigG): the module path with ``_`` for
  ``.``, in diffusers' names (``down_blocks_0_attentions_0_…``) or the original SD names (``input_blocks_1_1_…``,
  ``middle_block_…``, ``output_blocks_…``, ``time_embed_0``, ``out_2``); the tensor name follows the
  first dot (``lora_down.weight``, ``hada_w1_a``, ``lokr_w2``, ``diff``, ``dora_scale``, ``alpha``...).
- **diffusers / peft** ``unet.<module path><ending>``, ``text_encoder.…``, ``text_encoder_2.…`` (SDXL):
  peft's ``.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_magnitude_vector`` (DoRA) and its LoHa /
  LoKr parameter names (``.hada_w1_a``, ``.lokr_w1``...), diffusers 0.2x's ``.lora.down.weight`` and
  ``.lora_linear_layer.down.weight``, and diffusers 0.1x's attention processors
  (``<attention>.processor.to_q_lora.down.weight`` adapts ``<attention>.to_q``).

Every tensor name is read as the kohya name of the same tensor (``lora_A`` is ``lora_down``), so
``ldm.adapters.formats`` sees one vocabulary. ``module_lookup`` turns the module names of a file
into the model's modules, for both spellings of the U-Net.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ldm.loading.keymap import unet_original_key

# kohya: the key's prefix names the network; the module's flat name follows, its tensor name comes after the first dot.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_TENSORS = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",  # LoRA / LoCon, DoRA
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",  # LoHa
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",  # LoKr
    "diff", "diff_b", "w_norm", "b_norm",  # full and norm differences
)  # fmt: skip
# Kinds of adapters that ldm does not apply, by a tensor name they write (named in the error).
UNSUPPORTED_TENSORS = {
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "OFT", "boft_R": "BOFT", "lokr_t1": "LoKr with a Tucker w1",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "on_input": "(IA)^3", "weight": "(IA)^3", "scale": "scaled LoRA (lora_down.scale)",
}  # fmt: skip
# diffusers / peft: "unet." or "text_encoder.", the module path, then one of these endings -> the kohya tensor name.
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
DIFFUSERS_ENDINGS = {
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",  # peft
    ".lora_magnitude_vector": "lora_magnitude_vector", ".lora_magnitude_vector.weight": "lora_magnitude_vector",
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",  # diffusers 0.2x U-Nets
    ".lora_linear_layer.down.weight": "lora_down.weight", ".lora_linear_layer.up.weight": "lora_up.weight",
    **{f".{name}": name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{f".{name}": name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}  # fmt: skip
# diffusers 0.1x attention processors: "<attention>[.processor].to_q_lora.down.weight", a projection of <attention>.
PROCESSOR_ENDINGS = {".down.weight": "lora_down.weight", ".up.weight": "lora_up.weight"}
CLIP_PROJECTIONS = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
PROCESSOR_PROJECTIONS = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text_encoder": CLIP_PROJECTIONS,
    "text_encoder_2": CLIP_PROJECTIONS,
}
# The networks adapters patch: the U-Net and the text encoders (SDXL's second one, OpenCLIP bigG, is text_encoder_2).
TEXT_PARTS = ("text_encoder", "text_encoder_2")
# Modules of transformers' CLIPTextModelWithProjection outside its ``text_model`` (SDXL's pooled-text projection).
CLIP_TOP_LEVEL = ("text_projection",)
# Modules an adapter may change: weights of linear maps and convolutions, and the affine weights of norms.
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


class UnknownKey(Exception):
    """A key no layout places; ``reason`` completes "key K ..." in the error the reader raises."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def flat_name(part: str, module_name: str) -> str:
    """The kohya spelling of a module path; CLIP paths always start at ``text_model`` (as in
    transformers 4), whether or not this transformers version nests the encoder under it, except
    bigG's ``text_projection``, which sits beside ``text_model``."""
    if part in TEXT_PARTS and not module_name.startswith("text_model.") and module_name not in CLIP_TOP_LEVEL:
        module_name = "text_model." + module_name
    return module_name.replace(".", "_")


def parse_key(key: str) -> tuple[str, str, str]:
    """``(part, flat module name, kohya tensor name)`` of ``key``; ``UnknownKey`` says why not."""
    for prefix, part in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            module, _, tensor = key[len(prefix):].partition(".")
            if tensor not in KOHYA_TENSORS:
                raise UnknownKey(_unknown_tensor(tensor))
            return part, module, tensor
    for prefix, part in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            module, tensor = _diffusers_module(part, key[len(prefix):])
            return part, flat_name(part, module), tensor
    raise UnknownKey(
        "is neither kohya/LyCORIS (lora_unet_, lora_te_, lora_te1_, lora_te2_) nor diffusers/peft "
        "(unet., text_encoder., text_encoder_2.) adapter format; give a LoRA, LoCon, LoHa, LoKr or DoRA file for an SD or SDXL model"
    )


def diffusers_module_path(key: str) -> tuple[str, str] | None:
    """``(part, module path)`` of a key in a diffusers / peft layout (None for a kohya key)."""
    for prefix, part in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            return part, _diffusers_module(part, key[len(prefix):])[0]
    return None


def _unknown_tensor(tensor: str) -> str:
    if tensor in UNSUPPORTED_TENSORS:
        return f"is a {UNSUPPORTED_TENSORS[tensor]} weight ({tensor!r}), a kind of adapter ldm does not apply"
    return f"holds tensor {tensor!r}, a kind of adapter weight ldm does not know"


def _diffusers_module(part: str, rest: str) -> tuple[str, str]:
    """``(module path, kohya tensor name)`` of ``<module path><ending>`` in a diffusers / peft layout."""
    for ending in sorted(DIFFUSERS_ENDINGS, key=len, reverse=True):
        if rest.endswith(ending) and len(rest) > len(ending):
            return rest[: -len(ending)], DIFFUSERS_ENDINGS[ending]
    for ending, tensor in PROCESSOR_ENDINGS.items():
        attention, _, name = rest.removesuffix(ending).rpartition(".")
        if rest.endswith(ending) and name in PROCESSOR_PROJECTIONS[part]:
            return f"{attention.removesuffix('.processor')}.{PROCESSOR_PROJECTIONS[part][name]}", tensor
    if rest.endswith(".alpha"):
        # diffusers reads no alpha in its own layouts; applying one would scale differently from diffusers.
        raise UnknownKey("is an alpha in a diffusers/peft layout, which diffusers does not read; remove it or write the file in kohya layout")
    pieces = rest.split(".")
    ending = ".".join(pieces[-2:] if pieces[-1] == "weight" else pieces[-1:])
    raise UnknownKey(f"has ending {ending!r}, a kind of adapter weight ldm does not know")


def module_lookup(part: str, model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{flat name: (module path, module)}`` of every adaptable module of ``model``: its diffusers names
    and, for the U-Net, the original SD names (``input_blocks_…``) of the same modules."""
    found = {}
    for name, module in model.named_modules():
        # A module wrapped by peft for training holds its own weights in ``base_layer``.
        if isinstance(module, ADAPTABLE) and ".lora_" not in name:
            path = name.removesuffix(".base_layer")
            found[flat_name(part, path)] = (path, module)
    if part == "unet":
        original_name = original_namer(model)
        for path, module in list(found.values()):
            original = original_name(path)
            if original is not None:
                found[original.replace(".", "_")] = (path, module)
    return found


def original_namer(unet: nn.Module) -> Callable[[str], str | None]:
    """A function from a U-Net module's diffusers path to its original SD name (``input_blocks.4.1.…``), None where the
    original U-Net has no such module; the layout is read once from ``unet``'s keys."""
    keys = unet.state_dict().keys()
    layers = 1 + max(int(k.split(".")[3]) for k in keys if k.startswith("down_blocks.0.resnets."))
    up_attention = frozenset(int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k))

    def original_name(path: str) -> str | None:
        try:
            return unet_original_key(f"{path}.weight", layers, up_attention).removesuffix(".weight")
        except KeyError:
            return None

    return original_name
