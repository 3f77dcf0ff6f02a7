"""What a batch's captions condition the U-Net with, read as each model family was trained.

- SD 1.x / 2.x: the text encoder's last hidden states of each caption, padded and truncated to the
  tokenizer's 77 tokens (the context of the cross-attention).
- SDXL (Podell et al. 2023, sec. 2.1): CLIP ViT-L's and OpenCLIP bigG's hidden states before their
  last layer, side by side (the context), and bigG's pooled projection, which enters the time
  embedding with the micro-conditioning numbers (``time_ids``, sec. 2.2; see ``data.py``). This is
  what diffusers' SDXL pipelines and its SDXL training scripts feed the U-Net.

Prompt syntax (weights, ``BREAK``, long prompts) is generation's, not training's: captions are plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.models.text_encoder import sdxl_states, sdxl_states_and_pooled


@dataclass(frozen=True)
class CaptionEncoders:
    """The tokenizers and text encoders captions go through; the second pair only for SDXL."""

    tokenizer: object
    text_encoder: nn.Module
    tokenizer_2: object | None = None
    text_encoder_2: nn.Module | None = None


@dataclass(frozen=True)
class TextCondition:
    context: torch.Tensor  # (B, 77, width) for the cross-attention
    pooled: torch.Tensor | None  # (B, projection width): SDXL's pooled text embedding; None for SD 1.x / 2.x

    def row(self, i: int) -> TextCondition:
        return TextCondition(self.context[i], None if self.pooled is None else self.pooled[i])

    @staticmethod
    def stack(rows: list[TextCondition]) -> TextCondition:
        pooled = None if rows[0].pooled is None else torch.stack([row.pooled for row in rows])
        return TextCondition(torch.stack([row.context for row in rows]), pooled)

    def float(self) -> TextCondition:
        return TextCondition(self.context.float(), None if self.pooled is None else self.pooled.float())

    def to(self, device) -> TextCondition:
        return TextCondition(self.context.to(device), None if self.pooled is None else self.pooled.to(device))

    def added(self, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The U-Net's added-conditioning keywords: SDXL's pooled text and ``time_ids`` (B, 6); none for SD 1.x / 2.x."""
        if self.pooled is None:
            return {}
        return {"text_embeds": self.pooled, "time_ids": time_ids.to(self.pooled.device)}


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 77) ids of the captions, padded and truncated to the tokenizer's length."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_captions(captions: list[str], encoders: CaptionEncoders, device: torch.device) -> TextCondition:
    """The conditioning of ``captions``: by the text encoder alone, or as SDXL by both (see the module text)."""
    ids = token_ids(encoders.tokenizer, captions).to(device)
    if encoders.text_encoder_2 is None:
        return TextCondition(encoders.text_encoder(ids)[0], None)
    states = sdxl_states(encoders.text_encoder, ids)
    states_2, pooled = sdxl_states_and_pooled(encoders.text_encoder_2, token_ids(encoders.tokenizer_2, captions).to(device))
    return TextCondition(torch.cat([states, states_2.to(states.dtype)], dim=-1), pooled)
