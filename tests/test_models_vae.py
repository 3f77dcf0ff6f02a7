"""Our AutoencoderKL against diffusers' on the same random weights, plus sliced and tiled decoding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tiny_models import diffusers_vae
from torch import nn

from ldm.errors import InputError
from ldm.loading import DEFAULT_MODEL_DIR, load_vae_only
from ldm.models import AutoencoderKL, DiagonalGaussian, VAEConfig
from ldm.models.vae import _tile_starts, _tiled


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, AutoencoderKL]:
    ref = diffusers_vae()
    ours = AutoencoderKL(VAEConfig.from_diffusers(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_encode_matches_diffusers(pair):
    ref, ours = pair
    image = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist
        got = ours.encode(image)
    assert got.mean.shape == (2, 4, 8, 6)
    assert _rel(got.mean, expected.mean) < 1e-5
    assert _rel(got.logvar, expected.logvar) < 1e-5
    assert _rel(got.std, expected.std) < 1e-5
    # Same generator, same noise draw: the reparameterized samples agree too.
    sample = got.sample(torch.Generator().manual_seed(3))
    assert _rel(sample, expected.sample(torch.Generator().manual_seed(3))) < 1e-5
    assert torch.equal(got.mode(), got.mean)


def test_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 64, 48)
    assert _rel(got, expected) < 1e-5


def test_attention_backends_agree(pair):
    _, ours = pair
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours.decode(z)
        ours.set_attention("sliced", slice_size=7)
        sliced = ours.decode(z)
        ours.set_attention("sdpa")
    assert _rel(sliced, expected) < 1e-5


def test_meta_construction_then_assign_loading(pair):
    ref, ours = pair
    with torch.device("meta"):
        fresh = AutoencoderKL(ours.config)
    fresh.load_state_dict(ref.state_dict(), strict=True, assign=True)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert _rel(fresh.eval().decode(z), ref.decode(z).sample) < 1e-5


def test_logvar_is_clamped_as_in_sd():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    moments[:, 4:, 0, 0] = -100.0
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.max() == 20.0 and posterior.logvar.min() == -30.0
    assert torch.isfinite(posterior.std).all()


def test_kl_of_standard_normal_is_zero_and_grows_with_the_mean():
    posterior = DiagonalGaussian(torch.zeros(2, 8, 3, 3))
    assert torch.equal(posterior.kl(), torch.zeros(2))
    shifted = DiagonalGaussian(torch.cat([torch.ones(1, 4, 3, 3), torch.zeros(1, 4, 3, 3)], dim=1))
    assert shifted.kl().item() == pytest.approx(0.5 * 4 * 9)


def test_decode_sliced_equals_decode(pair):
    _, ours = pair
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(ours.decode_sliced(z), ours.decode(z)) < 1e-5  # conv kernels differ by batch size


def test_tiled_decode_of_a_latent_within_one_tile_equals_plain_decode(pair):
    _, ours = pair
    z = torch.randn(1, 4, 8, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ours.decode_tiled(z, tile=16, overlap=4), ours.decode(z))
        image = ours.decode(z)
        assert torch.equal(ours.encode_tiled(image, tile=16, overlap=4).mean, ours.encode(image).mean)


def test_tiled_decode_runs_tile_by_tile_with_the_right_shape(pair):
    _, ours = pair
    z = torch.randn(1, 4, 20, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tiled = ours.decode_tiled(z, tile=8, overlap=4)
        plain = ours.decode(z)
        posterior = ours.encode_tiled(plain, tile=8, overlap=4)
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()
    assert posterior.mean.shape == z.shape
    with pytest.raises(InputError, match="overlap"):
        ours.decode_tiled(z, tile=8, overlap=8)
    with pytest.raises(InputError, match="multiple of 8"):
        ours.encode_tiled(torch.zeros(1, 3, 60, 64))


def test_tiles_cover_the_image_with_at_least_the_overlap():
    for length, tile, overlap in [(100, 32, 8), (64, 64, 16), (65, 64, 16), (33, 16, 4), (10, 16, 4)]:
        starts = _tile_starts(length, tile, overlap)
        assert starts[0] == 0 and min(length, starts[-1] + tile) == length
        for a, b in zip(starts, starts[1:]):
            assert a + tile - b >= overlap


class _LocalUpsampler(nn.Module):
    """A conv net with a 2-pixel receptive radius and no normalization: local, so tiling can be exact."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(z))).repeat_interleave(8, -1).repeat_interleave(8, -2)


def test_tiling_a_local_network_gives_exactly_the_untiled_result():
    net = _LocalUpsampler()
    z = torch.randn(1, 4, 40, 29, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        # Receptive radius 2 latent px < a quarter of the 12-px overlap.
        tiled = _tiled(net, z, 16, 12, lambda n: n * 8)
        assert _rel(tiled, net(z)) < 1e-6
        # With no overlap the tile borders are wrong: the blending above is what makes it exact.
        assert _rel(_tiled(net, z, 16, 0, lambda n: n * 8), net(z)) > 1e-3


def test_blending_crossfades_tiles_that_disagree_without_a_seam():
    # Each tile comes back offset by its own constant, as tiles normalized with different statistics do.
    offsets = iter(torch.arange(100.0) * 10)

    def shifted(tile: torch.Tensor) -> torch.Tensor:
        return tile + next(offsets)

    x = torch.zeros(1, 1, 1, 100)
    out = _tiled(shifted, x, 40, 16, lambda n: n)[0, 0, 0]
    steps = out.diff().abs()
    # Tiles start at 0, 24, 48, 60 and differ by 10: a hard seam would jump by 10 in one pixel;
    # the crossfade spreads each step over the middle half (8 px) of the overlap.
    assert steps.max() <= 10 / 8 + 1e-4
    assert out[0] == 0 and out[-1] == 30


# --- tiling the default model's trained VAE -----------------------------------------------------------
#
# Each tile is normalized (GroupNorm) and attended over (the middle block) on its own, so a tiled result
# is not the plain one; the bounds below are about twice the measured error. diffusers' enable_tiling()
# blends differently by design (it crops each tile and ramps linearly over the previous tile's edge only,
# with partial last tiles), so it is no reference for this blending.

TILE, OVERLAP = 24, 8  # latent pixels: 48 x 48 latents give tiles at 0, 16 and 24 in each direction


@pytest.fixture(scope="module")
def trained_vae() -> AutoencoderKL:
    return load_vae_only(DEFAULT_MODEL_DIR).eval()


@pytest.fixture(scope="module")
def latents_and_image(trained_vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latents of unit-variance scaled latents, 48 x 48, and their plain decode (384 x 384)."""
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0)) / trained_vae.config.scaling_factor
    with torch.no_grad():
        return z, trained_vae.decode(z)


@contextmanager
def input_sizes(module: nn.Module) -> Iterator[list[tuple[int, int]]]:
    """(height, width) of every input ``module`` runs on inside the block."""
    sizes: list[tuple[int, int]] = []
    handle = module.register_forward_pre_hook(lambda _, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        yield sizes
    finally:
        handle.remove()


def test_tiled_decode_of_the_trained_vae_stays_close_to_the_plain_decode(trained_vae, latents_and_image):
    z, plain = latents_and_image
    with input_sizes(trained_vae.decoder) as sizes, torch.no_grad():
        tiled = trained_vae.decode_tiled(z, tile=TILE, overlap=OVERLAP)
    assert sizes == [(TILE, TILE)] * 9
    # Measured max |tiled - plain| = 0.74 (mean 0.025) in an image of range [-1, 1].
    assert (tiled - plain).abs().max() < 1.5


def test_tiled_encode_of_the_trained_vae_stays_close_to_the_plain_encode(trained_vae, latents_and_image):
    image = latents_and_image[1].clamp(-1, 1)
    with torch.no_grad():
        plain = trained_vae.encode(image)
        with input_sizes(trained_vae.encoder) as sizes:
            tiled = trained_vae.encode_tiled(image, tile=TILE, overlap=OVERLAP)
    assert sizes == [(8 * TILE, 8 * TILE)] * 9
    # Measured max differences: 0.67 in the means (which reach 10.8) and 0.0019 in the stds.
    assert (tiled.mean - plain.mean).abs().max() < 1.5
    assert (tiled.std - plain.std).abs().max() < 0.005
