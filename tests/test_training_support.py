"""Shared pieces of the training tests (no tests here): a micro model, colour datasets, a sampler.

The micro U-Net (two levels, one layer each, ~0.4 M parameters) makes a training step take tens of
milliseconds on a CPU, so learning tests with a few hundred steps stay fast.

A random-weight KL-VAE cannot carry a flat colour: every GroupNorm removes a spatially constant
signal, so red and blue images encode to nearly the same latent. The "learns a colour" tests
therefore use ``PoolingAutoencoder``, an exact autoencoder for flat colours with the VAE's
interface; fine-tuning trains the U-Net only, so what is tested is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import clip_text_model, clip_tokenizer

from torch import nn
from torch.nn import functional as F

from ldm.models import AutoencoderKL, DiagonalGaussian, UNet, UNetConfig, VAEConfig
from ldm.schedulers import SchedulerConfig

MICRO_UNET = UNetConfig(
    block_out_channels=(32, 32),
    layers_per_block=1,
    cross_attention_levels=(True, False),
    num_attention_heads=(2, 2),
    cross_attention_dim=64,
    sample_size=4,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while a training test module runs, restored afterwards.

    On this shared 2-core machine, tiny convolutions on two contended threads ran up to 80 times
    slower than on one (a 32 px VAE encode: 0.8 s against 0.01 s). Test modules import this fixture.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class PoolingAutoencoder(nn.Module):
    """Scaled latent = the 8x8 mean of (R, G, B, 0) in [-1, 1]; decoding repeats it (nearest upsampling)."""

    def __init__(self):
        super().__init__()
        self.config = VAEConfig.tiny()
        # Gives the module a device and dtype; a (frozen) parameter, as the pipeline finds a module's
        # device from its first parameter.
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        pooled = F.avg_pool2d(x, self.config.downsample_factor)
        mean = torch.cat([pooled, torch.zeros_like(pooled[:, :1])], dim=1) / self.config.scaling_factor
        return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z[:, :3] * self.config.scaling_factor, scale_factor=self.config.downsample_factor, mode="nearest")

    def set_attention(self, backend, slice_size=None) -> None:
        return None


@dataclass
class MicroModels:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: SchedulerConfig
    generation_config: dict = dataclasses.field(default_factory=dict)


def micro_models(seed: int = 0, pooling_vae: bool = False) -> MicroModels:
    torch.manual_seed(seed)
    unet = UNet(MICRO_UNET)
    torch.manual_seed(seed + 1)
    vae = PoolingAutoencoder() if pooling_vae else AutoencoderKL(VAEConfig.tiny())
    return MicroModels(unet, vae, clip_text_model("sd1", seed), clip_tokenizer("sd1"), SchedulerConfig())


def save_micro_model(folder: Path, seed: int = 0) -> Path:
    """The micro model as a diffusers folder (what ``ldm finetune --model`` reads)."""
    from ldm.loading import Components, save_diffusers

    models = micro_models(seed)
    components = Components(
        unet=models.unet, vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
        scheduler_config=models.scheduler_config, family="sd1", source=Path(folder),
    )
    return save_diffusers(components, folder)


def colour_folder(folder: Path, colours: dict[str, tuple[int, int, int]], per_caption: int = 2, size: int = 32) -> Path:
    """``per_caption`` solid images of each colour, captioned with its key."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, (caption, colour) in enumerate(colours.items()):
        for copy in range(per_caption):
            Image.new("RGB", (size, size), colour).save(folder / f"{number}-{copy}.png")
            (folder / f"{number}-{copy}.txt").write_text(caption)
    return folder


def redness(images) -> float:
    """Mean of (R - B) over images in [0, 255] (positive: red dominates)."""
    values = [np.asarray(image, dtype=np.float64) for image in images]
    return float(np.mean([v[..., 0].mean() - v[..., 2].mean() for v in values]))


def generate(models, prompt: str, seeds=(0, 1), steps: int = 10, size: int = 32, guidance: float = 3.0):
    from ldm.pipeline import Pipeline

    pipeline = Pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer, models.scheduler_config)
    return [
        pipeline(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=seed).images[0]
        for seed in seeds
    ]


def parameters_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.state_dict().items()}
