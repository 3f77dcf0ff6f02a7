"""Our TAESD against diffusers' AutoencoderTiny on the same random weights; its configuration; the
img2img interface that TAESD's deterministic encoder shares with the KL-VAE's posterior."""

from __future__ import annotations

import pytest
import torch
from tiny_models import diffusers_taesd

from ldm.errors import ConfigError
from ldm.models import TAESD, DiagonalGaussian, PointPosterior, TAESDConfig

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_taesd()
    ours = TAESD(TAESDConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("config", [{}, {"latent_channels": 16}, TAESDConfig.tiny().to_diffusers()])
def test_state_dict_has_diffusers_keys_and_shapes(config):
    from diffusers import AutoencoderTiny

    values = {key: value for key, value in config.items() if not key.startswith("_")}
    ref = AutoencoderTiny(**values)
    ours = TAESD(TAESDConfig.from_diffusers(dict(ref.config)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_encode_and_decode_match_diffusers(pair):
    ref, ours = pair
    image = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        encoded, expected_latents = ours.encode(image), ref.encode(image).latents
        decoded, expected_images = ours.decode(z), ref.decode(z).sample
    assert encoded.latents.shape == (2, 4, 8, 6) and decoded.shape == (2, 3, 64, 48)
    assert (encoded.latents - expected_latents).abs().max() < TOLERANCE
    assert (decoded - expected_images).abs().max() < TOLERANCE
    assert expected_images.std() > 1e-3  # the comparison is not between two constants


def test_sliced_and_single_tile_decoding_equal_decode(pair):
    _, ours = pair
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours.decode(z)
        assert torch.allclose(ours.decode_sliced(z), whole, atol=1e-6)
        assert torch.equal(ours.decode_tiled(z), whole)  # fits in one tile
        tiled = ours.decode_tiled(torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(3)), tile=16, overlap=8)
    assert tiled.shape == (1, 3, 192, 192) and torch.isfinite(tiled).all()


def test_tiled_encoding_equals_encode_within_a_tile_and_blends_beyond(pair):
    _, ours = pair
    image = torch.rand(1, 3, 192, 128, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        whole = ours.encode(image).latents
        assert torch.equal(ours.encode_tiled(image).latents, whole)  # fits in one tile
        tiled = ours.encode_tiled(image, tile=8, overlap=4).latents
    assert tiled.shape == whole.shape == (1, 4, 24, 16)
    # TAESD has no normalization: tiles agree away from their edges, and the crossfade keeps them close there
    assert (tiled - whole).abs().max() < 0.1 * whole.abs().max()


def test_config_reads_the_released_taesd_config_and_names_what_it_refuses():
    released = {
        "_class_name": "AutoencoderTiny", "_diffusers_version": "0.20.0", "act_fn": "relu",
        "decoder_block_out_channels": [64, 64, 64, 64], "encoder_block_out_channels": [64, 64, 64, 64],
        "force_upcast": False, "in_channels": 3, "latent_channels": 4, "latent_magnitude": 3, "latent_shift": 0.5,
        "num_decoder_blocks": [3, 3, 3, 1], "num_encoder_blocks": [1, 3, 3, 3], "out_channels": 3,
        "scaling_factor": 1.0, "upsampling_scaling_factor": 2, "block_out_channels": [64, 64, 64, 64],
    }  # fmt: skip
    config = TAESDConfig.from_diffusers(released)
    assert config == TAESDConfig() and config.downsample_factor == 8 and config.scaling_factor == 1.0
    for change, named in (
        ({"act_fn": "silu"}, "act_fn"),
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"encoder_block_out_channels": [32, 64, 64, 64]}, "encoder_block_out_channels"),
        ({"num_decoder_blocks": [3, 3, 1]}, "decoder"),
        ({"something_new": 1}, "something_new"),
    ):
        with pytest.raises(ConfigError, match=named):
            TAESDConfig.from_diffusers({**released, **change})


def test_posteriors_share_the_img2img_interface_and_only_the_kl_one_draws_noise():
    latents = torch.randn(1, 4, 2, 2)
    calls = []

    def noise() -> torch.Tensor:
        calls.append(1)
        return torch.ones(3, 4, 2, 2, dtype=torch.float64)

    assert PointPosterior(latents).sample_with(noise) is latents and calls == []
    moments = torch.cat([latents, torch.full_like(latents, 2.0)], dim=1)
    sample = DiagonalGaussian(moments).sample_with(noise)
    assert calls == [1] and sample.shape == (3, 4, 2, 2) and sample.dtype == torch.float64
    assert torch.allclose(sample, latents.double() + torch.e)  # mean + exp(logvar / 2) * 1


def test_a_taesd_model_previews_through_taesd_at_full_size(pair):
    from ldm.images import to_pil
    from ldm.models import AutoencoderKL, VAEConfig
    from ldm.previews import preview

    _, ours = pair
    denoised = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = to_pil((ours.decode(denoised[:1]) / 2 + 0.5).clamp(0, 1))[0]
    got = preview(ours, denoised)
    assert got.size == (40, 48) and got.tobytes() == expected.tobytes()  # the first image, 8x the latents
    assert preview(AutoencoderKL(VAEConfig.tiny()), denoised).size == (5, 6)  # a KL-VAE: the linear map
    assert preview(AutoencoderKL(VAEConfig.tiny()), torch.zeros(1, 16, 6, 5)) is None  # not SD's 4 channels
