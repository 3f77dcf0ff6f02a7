"""Small random-weight SDXL-shaped reference models built with diffusers and transformers.

The structure of SDXL 1.0 base and refiner at a size that runs in milliseconds on a CPU: a plain
top level, spatial transformers of several blocks, 64-channel heads, the text_time added
conditioning (256-wide sinusoids per micro-conditioning number, as released), CLIP ViT-L beside
OpenCLIP bigG (a text projection narrower than its width, so a transposed projection shows). They
keep the conventions that single files do not record (32 GroupNorm groups, 64-channel U-Net and
CLIP heads, addition_time_embed_dim 256), so a single-file copy is detected as a real one is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "ldm" / "assets" / "clip_tokenizer"

Kind = Literal["base", "refiner"]

CLIP_L_WIDTH, BIGG_WIDTH, POOLED_WIDTH = 64, 128, 96
TIME_IDS = {"base": 6, "refiner": 5}


def unet(kind: Kind = "base", seed: int = 0, in_channels: int = 4):
    """The U-Net; ``in_channels=9``: an inpainting model's (latents, mask, masked image's latents)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "base":
        levels = dict(
            block_out_channels=(64, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(1, 1, 2),
            transformer_layers_per_block=(1, 2, 3),
            cross_attention_dim=CLIP_L_WIDTH + BIGG_WIDTH,
        )
    else:
        levels = dict(
            block_out_channels=(64, 64, 128, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(1, 1, 2, 2),
            transformer_layers_per_block=2,
            cross_attention_dim=BIGG_WIDTH,
        )
    return UNet2DConditionModel(
        sample_size=128,  # SDXL's (1024 px): only recorded, and what single files are read with
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED_WIDTH + TIME_IDS[kind] * 256,
        **levels,
    ).eval()


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()


def clip_l(seed: int = 0):
    """CLIP ViT-L's structure (quick_gelu), as SDXL's first text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=CLIP_L_WIDTH, intermediate_size=128, num_attention_heads=1, num_hidden_layers=3,
        hidden_act="quick_gelu", projection_dim=CLIP_L_WIDTH, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def bigg(seed: int = 0):
    """OpenCLIP bigG's structure (gelu, a text projection), as SDXL's second text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed + 1)
    config = CLIPTextConfig(
        hidden_size=BIGG_WIDTH, intermediate_size=256, num_attention_heads=2, num_hidden_layers=3,
        hidden_act="gelu", projection_dim=POOLED_WIDTH, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad_token)


def scheduler():
    """SDXL's released scheduler: Euler on SD's betas, "leading" timesteps."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )


def pipeline(kind: Kind = "base", seed: int = 0):
    """A random-weight ``StableDiffusionXLPipeline`` (base) or ``StableDiffusionXLImg2ImgPipeline`` (refiner)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if kind == "base":
        return StableDiffusionXLPipeline(
            vae=vae(seed), text_encoder=clip_l(seed), text_encoder_2=bigg(seed), tokenizer=tokenizer("<|endoftext|>"),
            tokenizer_2=tokenizer("!"), unet=unet(kind, seed), scheduler=scheduler(), add_watermarker=False,
        )  # fmt: skip
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae(seed), text_encoder=None, text_encoder_2=bigg(seed), tokenizer=None, tokenizer_2=tokenizer("!"),
        unet=unet(kind, seed), scheduler=scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )  # fmt: skip


def save_folder(folder: Path, kind: Kind = "base", seed: int = 0) -> Path:
    """Write a random-weight SDXL model in the diffusers folder layout and return the folder."""
    pipeline(kind, seed).save_pretrained(folder)
    return Path(folder)
