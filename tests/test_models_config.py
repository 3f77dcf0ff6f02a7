"""UNetConfig / VAEConfig against the released diffusers config.json files and diffusers' own models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel

from ldm.errors import ConfigError
from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _UP,
}

# stabilityai/stable-diffusion-2-1 (768, v-prediction) unet/config.json
SD21_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": _DOWN,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": _UP,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-2-1-base (512, epsilon) unet/config.json
SD21_BASE_UNET = {**SD21_UNET, "sample_size": 64, "upcast_attention": False}

# runwayml/stable-diffusion-v1-5 vae/config.json (SD 2.1's differs only in sample_size 768)
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SD15_UNET, UNetConfig.sd1()),
        (SD21_UNET, UNetConfig.sd2()),
        (SD21_BASE_UNET, UNetConfig(**{**UNetConfig.sd2().__dict__, "sample_size": 64, "upcast_attention": False})),
    ],
    ids=["sd15", "sd21", "sd21-base"],
)
def test_unet_config_reads_released_configs(config, expected):
    assert UNetConfig.from_diffusers(config) == expected


def test_vae_config_reads_released_config():
    assert VAEConfig.from_diffusers(SD_VAE) == VAEConfig.sd()
    assert VAEConfig.from_diffusers({**SD_VAE, "sample_size": 768, "force_upcast": True}).sample_size == 768


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"transformer_layers_per_block": [1, 2, 10]}, "transformer_layers_per_block"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"num_class_embeds": 1000}, "num_class_embeds"),
        ({"only_cross_attention": [False, True, False, False]}, "only_cross_attention"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"encoder_hid_dim": 4096}, "encoder_hid_dim"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"num_attention_heads": 8}, "num_attention_heads"),
        ({"cross_attention_dim": [768, 1024, 768, 768]}, "cross_attention_dim"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] + _DOWN[1:]}, "down_block_types"),
        ({"up_block_types": _UP[::-1]}, "up_block_types"),
        ({"attention_head_dim": [8, 8]}, "attention_head_dim"),
        ({"block_out_channels": [320, 640, 1280]}, "down_block_types"),
    ],
)
def test_unet_config_rejects_unsupported_variant_naming_the_key(change, key):
    with pytest.raises(ConfigError) as info:
        UNetConfig.from_diffusers({**SD15_UNET, **change})
    message = str(info.value)
    assert key in message and "\n" not in message


def test_unet_config_accepts_per_block_spelling_of_defaults():
    config = {**SD21_UNET, "transformer_layers_per_block": [1, 1, 1, 1], "only_cross_attention": [False] * 4}
    assert UNetConfig.from_diffusers(config) == UNetConfig.sd2()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"use_quant_conv": False}, "use_quant_conv"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"down_block_types": ["DownEncoderBlock2D"] * 3}, "down_block_types"),
        ({"layers_per_block": 2.5}, "layers_per_block"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_vae_config_rejects_unsupported_variant_naming_the_key(change, key):
    with pytest.raises(ConfigError) as info:
        VAEConfig.from_diffusers({**SD_VAE, **change})
    assert key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("config", [UNetConfig.sd1(), UNetConfig.sd2(), UNetConfig.tiny()], ids=["sd1", "sd2", "tiny"])
def test_unet_config_round_trip_and_diffusers_builds_the_same_keys(config):
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config.to_diffusers())
        ours = UNet(config)
    assert _shapes(ours) == _shapes(ref)
    assert UNetConfig.from_diffusers(ref.config) == config


@pytest.mark.parametrize("config", [VAEConfig.sd(), VAEConfig.tiny()], ids=["sd", "tiny"])
def test_vae_config_round_trip_and_diffusers_builds_the_same_keys(config):
    assert VAEConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        ref = DiffusersVAE.from_config(config.to_diffusers())
        ours = AutoencoderKL(config)
    assert _shapes(ours) == _shapes(ref)
    # diffusers writes force_upcast=True into every AutoencoderKL config (only its SDXL pipelines read it); the
    # loaders decide it per model family (ldm.loading.configs.as_released), the config reads it as written.
    assert ref.config.force_upcast is True
    assert VAEConfig.from_diffusers(ref.config) == dataclasses.replace(config, force_upcast=True)


@pytest.mark.parametrize(
    ("config", "parameters"),  # the published SD 1.5 / SD 2.x U-Net sizes
    [(SD15_UNET, 859_520_964), (SD21_UNET, 865_910_724), (SD21_BASE_UNET, 865_910_724)],
    ids=["sd15", "sd21", "sd21-base"],
)
def test_full_size_unet_matches_diffusers_key_by_key(config, parameters):
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config)
        ours = UNet(UNetConfig.from_diffusers(config))
    assert _shapes(ours) == _shapes(ref)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == parameters


def test_missing_keys_mean_diffusers_defaults():
    with torch.device("meta"):
        assert _shapes(UNet(UNetConfig.from_diffusers({}))) == _shapes(UNet2DConditionModel.from_config({}))
        assert _shapes(AutoencoderKL(VAEConfig.from_diffusers({}))) == _shapes(DiffusersVAE.from_config({}))


def test_full_size_vae_matches_diffusers_key_by_key():
    with torch.device("meta"):
        ref = DiffusersVAE.from_config(SD_VAE)
        ours = AutoencoderKL(VAEConfig.from_diffusers(SD_VAE))
    assert _shapes(ours) == _shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863


def test_config_validation_rejects_inconsistent_fields():
    with pytest.raises(ConfigError, match="one cross_attention_levels"):
        UNetConfig(block_out_channels=(32, 64))
    with pytest.raises(ConfigError, match="divisible"):
        UNetConfig(num_attention_heads=(7, 8, 8, 8))
    with pytest.raises(ConfigError, match="divisible"):
        VAEConfig(block_out_channels=(48, 64))


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}
