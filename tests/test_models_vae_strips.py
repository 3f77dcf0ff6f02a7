"""The strip-wise VAE decoder (ldm.models.vae_strips): the same function as the plain layer-by-layer
decoder, with maps freed band by band as they are consumed."""

from __future__ import annotations

import pytest
import torch

from ldm.models import AutoencoderKL, VAEConfig
from ldm.models import vae_strips
from ldm.models.layers import ResnetBlock
from ldm.models.vae_strips import Bands, Moments


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig.tiny()).eval().requires_grad_(False)


@pytest.mark.parametrize("strip_pixels", [2**14, 40, 1])
@pytest.mark.parametrize("batch, height, width", [(1, 9, 7), (2, 6, 10)])
def test_strip_decode_equals_the_plain_decoder(vae, monkeypatch, strip_pixels, batch, height, width):
    z = torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(1))
    z_before = z.clone()
    with torch.enable_grad():  # autograd on: the plain layer-by-layer path
        expected = vae.decode(z)
    monkeypatch.setattr(vae_strips, "STRIP_PIXELS", strip_pixels)  # 1: strips of MIN_STRIP_ROWS rows
    with torch.inference_mode():
        got = vae.decode(z)
    assert got.shape == expected.shape == (batch, 3, 8 * height, 8 * width)
    assert got.is_contiguous()
    assert _rel(got, expected) < 1e-5
    assert torch.equal(z, z_before)  # in-place work stays on the decoder's own maps


@pytest.mark.parametrize("strip_pixels", [2**14, 40, 1])
@pytest.mark.parametrize("batch, height, width", [(1, 72, 56), (2, 48, 80), (1, 66, 70)])
def test_strip_encode_equals_the_plain_encoder(vae, monkeypatch, strip_pixels, batch, height, width):
    """Also at sizes that are not a multiple of 8 (66 x 70), where the downsamplers' padding meets odd maps."""
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x_before = x.clone()
    with torch.enable_grad():  # autograd on: the plain layer-by-layer path
        expected = vae.encode(x)
    monkeypatch.setattr(vae_strips, "STRIP_PIXELS", strip_pixels)  # 1: strips of MIN_STRIP_ROWS rows
    with torch.inference_mode():
        got = vae.encode(x)
    assert got.mean.shape == expected.mean.shape == (batch, 4, height // 8, width // 8)
    assert _rel(got.mean, expected.mean) < 1e-5 and _rel(got.std, expected.std) < 1e-5
    assert torch.equal(x, x_before)


def test_moments_merged_band_by_band_equal_the_whole_maps_statistics():
    # A large common offset is where a one-pass sum of squares would lose the variance.
    x = torch.randn(2, 8, 13, 5, generator=torch.Generator().manual_seed(2)) * 0.1 + 30.0
    moments = Moments(2, 4, x.device)
    for top, bottom in [(0, 1), (1, 7), (7, 13)]:
        moments.add(x[:, :, top:bottom])
    mean, var = moments.mean_var()
    groups = x.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean, groups.mean(dim=-1), rtol=1e-7, atol=0)  # float32 band means
    exact = groups.var(dim=-1, correction=0)
    torch.testing.assert_close(var, exact, rtol=2e-5, atol=0)
    # What the statistics are for: x normalized with them is at least as close to the exact
    # (float64) GroupNorm as torch's own float32 group_norm of the whole map, which the
    # reference implementation uses.
    exact_norm = ((groups - groups.mean(dim=-1, keepdim=True)) / (exact[..., None] + 1e-5).sqrt()).reshape(x.shape)
    ours = ((groups - mean[..., None]) / (var[..., None] + 1e-5).sqrt()).reshape(x.shape)
    torch_error = (torch.nn.functional.group_norm(x, 4).double() - exact_norm).abs().max()
    assert (ours - exact_norm).abs().max() <= torch_error


def _bands(x: torch.Tensor, cuts: list[int]) -> Bands:
    bands = Bands(x, x.shape[1], x.shape[2], x.shape[3]).track_moments(4)
    for top, bottom in zip([0, *cuts], [*cuts, x.shape[2]]):
        bands.append(x[:, :, top:bottom].contiguous())
    return bands


@pytest.mark.parametrize("channels_in", [8, 16], ids=["identity", "conv-shortcut"])
def test_resnet_in_strips_equals_the_block_and_frees_its_input(monkeypatch, channels_in):
    torch.manual_seed(3)
    block = ResnetBlock(channels_in, 8, None, 4, 1e-6).eval()
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):  # non-trivial affine GroupNorms
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, channels_in, 11, 6, generator=torch.Generator().manual_seed(4))
    expected = block(x)
    monkeypatch.setattr(vae_strips, "STRIP_PIXELS", 18)  # 3 rows per strip, bands of other heights
    source = _bands(x, [2, 7])
    with torch.inference_mode():
        out = vae_strips.resnet(block, source, groups=4)
    assert _rel(out.tensor(), expected) < 1e-5
    assert list(source.pieces(0, 11)) == []  # every band of the input was released
    mean, var = out.moments(4).mean_var()  # tracked while the output was built
    groups = expected.double().reshape(1, 4, -1)
    torch.testing.assert_close(mean, groups.mean(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, groups.var(dim=-1, correction=0), rtol=1e-5, atol=1e-6)


def test_upsample_in_strips_equals_nearest_upsampling_then_the_conv(monkeypatch):
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 7, 5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    monkeypatch.setattr(vae_strips, "STRIP_PIXELS", 20)
    source = _bands(x, [3])
    with torch.inference_mode():
        out = vae_strips.upsample(conv, source, groups=4)
    assert _rel(out.tensor(), expected) < 1e-5
    assert list(source.pieces(0, 7)) == []
