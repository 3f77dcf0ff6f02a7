"""The CLIP text encoder tau_theta(y) that conditions the U-Net (Rombach et al. 2022, sec. 3.3).

We use ``transformers.CLIPTextModel`` as is (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"); this module pins its SD configurations, the
clip-skip rule and the tokenizer shipped in ``ldm/assets/clip_tokenizer``.

- SD 1.x: OpenAI CLIP ViT-L/14 text tower (12 layers, width 768, 12 heads, quick_gelu).
- SD 2.x: OpenCLIP ViT-H/14 text tower, 24 layers of width 1024, of which SD uses the
  penultimate layer. The diffusers layout stores only the first 23 layers, so the 23-layer
  model's ``last_hidden_state`` (after ``final_layer_norm``) is exactly SD 2's conditioning.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm.errors import ConfigError, InputError

if TYPE_CHECKING:
    from transformers import CLIPTextModel  # only annotates here; ldm.loading builds it

Family = Literal["sd1", "sd2"]

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"

# The released text_encoder/config.json files (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1), architecture fields only. The token ids are the
# legacy values those files carry (eos_token_id=2 makes transformers pool at argmax(input_ids),
# i.e. at <|endoftext|>, as the original CLIP code does).
_CONFIGS: dict[str, dict[str, object]] = {
    "sd1": dict(
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
    "sd2": dict(
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
}

# SD 2.x (OpenCLIP) pads prompts with "!" (id 0); SD 1.x pads with <|endoftext|>.
_PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}


def clip_config(family: Family) -> CLIPTextConfig:
    """The ``CLIPTextConfig`` of the SD ``family``'s text encoder."""
    if family not in _CONFIGS:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(_CONFIGS)}")
    return CLIPTextConfig(**_CONFIGS[family])


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


def load_tokenizer(family_or_path: Family | str | Path) -> CLIPTokenizer:
    """The shipped CLIP tokenizer set up for ``"sd1"`` or ``"sd2"``, or a tokenizer folder."""
    if family_or_path in _PAD_TOKENS:
        return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=_PAD_TOKENS[str(family_or_path)])
    folder = Path(family_or_path)
    if not is_tokenizer_folder(folder):
        raise ConfigError(
            f"{folder} is not a CLIP tokenizer folder (needs tokenizer.json, or vocab.json and merges.txt); pass 'sd1' or 'sd2'"
        )
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def is_tokenizer_folder(folder: Path) -> bool:
    """True if ``folder`` holds a tokenizer: ``tokenizer.json`` (transformers 5) or ``vocab.json`` + ``merges.txt``."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
