"""The CLIP text encoders tau_theta(y) that condition the U-Net (Rombach et al. 2022, sec. 3.3).

We use ``transformers.CLIPTextModel`` and ``CLIPTextModelWithProjection`` as they are (Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision"); this module pins
their SD configurations, the clip-skip rule, SDXL's reading of its two encoders and the tokenizer
shipped in ``ldm/assets/clip_tokenizer``.

- SD 1.x: OpenAI CLIP ViT-L/14 text tower (12 layers, width 768, 12 heads, quick_gelu).
- SD 2.x: OpenCLIP ViT-H/14 text tower, 24 layers of width 1024, of which SD uses the
  penultimate layer. The diffusers layout stores only the first 23 layers, so the 23-layer
  model's ``last_hidden_state`` (after ``final_layer_norm``) is exactly SD 2's conditioning.
- SDXL (Podell et al. 2023, sec. 2.1): CLIP ViT-L (``text_encoder``) and OpenCLIP ViT-bigG/14
  (``text_encoder_2``: 32 layers of width 1280, 20 heads, gelu, a 1280 x 1280 text projection).
  Both are read at the penultimate layer *without* the final layer norm, and their states are
  concatenated along the width (768 + 1280 = 2048); bigG's pooled output (the final layer-normed
  EOS token through the text projection) also conditions the U-Net. The refiner has bigG alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm.errors import ConfigError, InputError

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # only annotate here; ldm.loading builds them

Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]
Encoder = Literal["clip-l", "openclip-h", "openclip-bigg"]

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"

# The released text_encoder/config.json files (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0's text_encoder_2),
# architecture fields only. The token ids are the legacy values those files carry (eos_token_id=2
# makes transformers pool at argmax(input_ids), i.e. at <|endoftext|>, as the original CLIP code does).
_CONFIGS: dict[Encoder, dict[str, object]] = {
    "clip-l": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "openclip-h": dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=512,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "openclip-bigg": dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1280,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
}

# Each family's text encoders, in diffusers' slots (text_encoder, text_encoder_2); None: the slot is empty.
ENCODERS: dict[Family, tuple[Encoder | None, Encoder | None]] = {
    "sd1": ("clip-l", None),
    "sd2": ("openclip-h", None),
    "sdxl": ("clip-l", "openclip-bigg"),
    "sdxl-refiner": (None, "openclip-bigg"),
}

# The pad token of each family's tokenizers (tokenizer, tokenizer_2). OpenCLIP pads with 0, which the
# CLIP vocabulary spells "!": SD 2.x's tokenizer and SDXL's tokenizer_2 pad with "!"; SD 1.x's and
# SDXL's first tokenizer (CLIP ViT-L's) pad with <|endoftext|>. Otherwise they are the same CLIP BPE
# tokenizer (the released tokenizer_2/ differs from tokenizer/ in its pad token alone).
_PAD_TOKENS: dict[Family, tuple[str | None, str | None]] = {
    "sd1": ("<|endoftext|>", None),
    "sd2": ("!", None),
    "sdxl": ("<|endoftext|>", "!"),
    "sdxl-refiner": (None, "!"),
}


def _slot(table: dict, family: str, slot: int, what: str):
    if family not in table:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(table)}")
    value = table[family][slot]
    if value is None:
        raise ConfigError(f"the {family} family has no {what}")
    return value


def clip_config(family: Family) -> CLIPTextConfig:
    """The ``CLIPTextConfig`` of the ``family``'s (first) text encoder."""
    return CLIPTextConfig(**_CONFIGS[_slot(ENCODERS, family, 0, "text_encoder")])


def clip_config_2(family: Family) -> CLIPTextConfig:
    """The ``CLIPTextConfig`` of the ``family``'s second text encoder (SDXL's OpenCLIP bigG, with its projection)."""
    return CLIPTextConfig(**_CONFIGS[_slot(ENCODERS, family, 1, "text_encoder_2")])


def encode_tokens(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Token ids (B, 77) -> conditioning (B, 77, hidden_size).

    ``clip_skip`` has diffusers' meaning: None or 0 uses the last layer; k > 0 uses the output of
    the layer k before the last (``hidden_states[-(k + 1)]``), passed through ``final_layer_norm``
    as the last layer's output is.
    """
    if not clip_skip:
        return text_encoder(input_ids).last_hidden_state
    layers = text_encoder.config.num_hidden_layers
    if not 0 < clip_skip < layers:
        raise InputError(f"clip_skip={clip_skip} must be between 0 and {layers - 1} for this text encoder")
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return text_encoder.final_layer_norm(hidden)


def sdxl_states(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """SDXL's conditioning from one text encoder: token ids (B, 77) -> (B, 77, hidden_size), the output of the
    layer before the last (``hidden_states[-2]``), without the final layer norm, as SDXL was trained and as
    diffusers' ``StableDiffusionXLPipeline.encode_prompt`` reads it. ``clip_skip`` k > 0 reads k layers earlier."""
    return _sdxl_hidden(text_encoder(input_ids, output_hidden_states=True).hidden_states, clip_skip)


def sdxl_states_and_pooled(
    text_encoder_2: CLIPTextModelWithProjection, input_ids: torch.Tensor, clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sdxl_states`` of the second encoder and its pooled output (B, projection_dim): the final layer-normed
    EOS token through the text projection, which conditions the U-Net beside the time embedding."""
    out = text_encoder_2(input_ids, output_hidden_states=True)
    return _sdxl_hidden(out.hidden_states, clip_skip), out.text_embeds


def _sdxl_hidden(hidden_states: tuple[torch.Tensor, ...], clip_skip: int | None) -> torch.Tensor:
    layers = len(hidden_states) - 1  # hidden_states[0] is the embedding layer's output
    skip = clip_skip or 0
    if not 0 <= skip < layers - 1:
        raise InputError(f"clip_skip={clip_skip} must be between 0 and {layers - 2} for this text encoder")
    return hidden_states[-(skip + 2)]


def load_tokenizer(family_or_path: Family | str | Path) -> CLIPTokenizer:
    """The shipped CLIP tokenizer set up as the ``family``'s (first) tokenizer, or a tokenizer folder."""
    if family_or_path in _PAD_TOKENS:
        pad = _slot(_PAD_TOKENS, str(family_or_path), 0, "tokenizer")
        return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad)
    return _tokenizer_folder(family_or_path)


def load_tokenizer_2(family_or_path: Family | str | Path) -> CLIPTokenizer:
    """The shipped CLIP tokenizer set up as the ``family``'s second tokenizer (SDXL's ``tokenizer_2``: pad "!"),
    or a tokenizer folder."""
    if family_or_path in _PAD_TOKENS:
        pad = _slot(_PAD_TOKENS, str(family_or_path), 1, "tokenizer_2")
        return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad)
    return _tokenizer_folder(family_or_path)


def _tokenizer_folder(family_or_path: str | Path) -> CLIPTokenizer:
    folder = Path(family_or_path)
    if not is_tokenizer_folder(folder):
        raise ConfigError(
            f"{folder} is not a CLIP tokenizer folder (needs tokenizer.json, or vocab.json and merges.txt); "
            f"pass one of {', '.join(_PAD_TOKENS)}"
        )
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def is_tokenizer_folder(folder: Path) -> bool:
    """True if ``folder`` holds a tokenizer: ``tokenizer.json`` (transformers 5) or ``vocab.json`` + ``merges.txt``."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
