"""The networks of latent diffusion: U-Net, KL autoencoder, tiny autoencoder (TAESD), CLIP text encoder helpers."""

from ldm.models.attention import AttentionBackend, set_kernels
from ldm.models.taesd import TAESD, PointPosterior, TAESDConfig
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["AttentionBackend", "AutoencoderKL", "DiagonalGaussian", "PointPosterior", "TAESD", "TAESDConfig", "UNet", "UNetConfig", "VAEConfig", "set_kernels"]
