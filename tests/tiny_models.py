"""Small random-weight SD-shaped reference models built with diffusers and transformers.

Tests use these as the reference implementation: they are saved in the real
formats (diffusers folder layout) and loaded back with ldm. The shapes follow
the SD structure (VAE downsampling factor 8, 4 latent channels, cross-attention
down / up levels with a plain deepest level) at a size that runs in
milliseconds on a CPU.

They also keep the conventions of the released checkpoints that cannot be
read from tensor shapes (32 GroupNorm groups; 8 U-Net heads for SD 1.x and
64-channel heads for SD 2.x; 64-channel CLIP heads), so a single-file copy of
them is detected from its keys and shapes exactly as a real checkpoint is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "ldm" / "assets" / "clip_tokenizer"

Family = Literal["sd1", "sd2"]


def diffusers_unet(family: Family = "sd1", seed: int = 0, time_cond_proj_dim: int | None = None, in_channels: int = 4):
    """The tiny U-Net; with ``time_cond_proj_dim``, a guidance-distilled (LCM) one with diffusers' ``cond_proj``;
    ``in_channels=9``: an inpainting model's (latents, mask, masked-image latents)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    sd2 = family == "sd2"
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(64, 128, 128) if sd2 else (32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128 if sd2 else 64,
        # diffusers' "attention_head_dim" holds the number of heads for SD configs.
        attention_head_dim=(1, 2, 2) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    ).eval()


def diffusers_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def diffusers_taesd(seed: int = 0, latent_channels: int = 4):
    """A random-weight diffusers ``AutoencoderTiny`` (TAESD's structure at width 16, one block per level)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
    ).eval()


def taesd_original_state_dicts(taesd) -> dict[str, dict]:
    """A diffusers ``AutoencoderTiny``'s weights as TAESD's standalone files name them: the encoder and
    decoder sequences without prefix, the decoder's indices one higher (its first layer is the clamp)."""
    files: dict[str, dict] = {"encoder": {}, "decoder": {}}
    for key, value in taesd.state_dict().items():
        part, _, index, rest = key.split(".", 3)
        files[part][f"{int(index) + (part == 'decoder')}.{rest}"] = value.clone()
    return files


def clip_text_model(family: Family = "sd1", seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd2 = family == "sd2"
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=128 if sd2 else 64,
        intermediate_size=256 if sd2 else 128,
        num_attention_heads=2 if sd2 else 1,
        num_hidden_layers=3 if sd2 else 2,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=128 if sd2 else 64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def clip_tokenizer(family: Family = "sd1"):
    from transformers import CLIPTokenizer

    # SD 2.x pads with "!" (id 0), SD 1.x with <|endoftext|>, as the released tokenizers do.
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!" if family == "sd2" else "<|endoftext|>")


def diffusers_pipeline(family: Family = "sd1", seed: int = 0):
    """A complete random-weight diffusers ``StableDiffusionPipeline``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=diffusers_vae(seed),
        text_encoder=clip_text_model(family, seed),
        tokenizer=clip_tokenizer(family),
        unet=diffusers_unet(family, seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def lcm_pipeline(time_cond_proj_dim: int = 32, seed: int = 0):
    """A random-weight diffusers ``LatentConsistencyModelPipeline``: an SD 1.x-shaped model whose U-Net
    takes the guidance scale as an embedding, with an ``LCMScheduler`` on SD's noise schedule."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=True)
    return LatentConsistencyModelPipeline(
        vae=diffusers_vae(seed),
        text_encoder=clip_text_model("sd1", seed),
        tokenizer=clip_tokenizer("sd1"),
        unet=diffusers_unet("sd1", seed, time_cond_proj_dim),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ldm_pipeline(reference):
    """An ldm Pipeline holding a diffusers reference pipeline's weights (same key names, strict load)."""
    from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
    from ldm.pipeline import Pipeline
    from ldm.schedulers import SchedulerConfig

    unet = UNet(UNetConfig.from_diffusers(dict(reference.unet.config)))
    unet.load_state_dict(reference.unet.state_dict(), strict=True)
    # force_upcast as ldm.loading reads an SD model's VAE (ldm.loading.configs.as_released): diffusers writes
    # its default, true, into every AutoencoderKL config, but only its SDXL pipelines read it.
    vae = AutoencoderKL(VAEConfig.from_diffusers({**reference.vae.config, "force_upcast": False}))
    vae.load_state_dict(reference.vae.state_dict(), strict=True)
    config = SchedulerConfig.from_diffusers(dict(reference.scheduler.config))
    return Pipeline(unet.eval(), vae.eval(), reference.text_encoder, reference.tokenizer, config)


def save_diffusers_folder(folder: Path, family: Family = "sd1", seed: int = 0, safe_serialization: bool = True) -> Path:
    """Write a random-weight model in the diffusers folder layout and return the folder."""
    diffusers_pipeline(family, seed).save_pretrained(folder, safe_serialization=safe_serialization)
    return Path(folder)
