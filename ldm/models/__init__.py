"""The three networks of latent diffusion: U-Net, KL autoencoder, CLIP text encoder helpers."""

from ldm.models.attention import AttentionBackend
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["AttentionBackend", "AutoencoderKL", "DiagonalGaussian", "UNet", "UNetConfig", "VAEConfig"]
