"""A1111's variation seeds (``subseed``, ``subseed_strength``): each image's starting noise leans toward that
of another seed by spherical interpolation (``ldm.random.slerp``), the same way from Python, the CLI and the server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import diffusers_pipeline, ldm_pipeline

from ldm.errors import SettingError
from ldm.images import parse_parameters
from ldm.random import randn, seed_generators, slerp

SMALL = dict(height=64, width=64, num_inference_steps=3)


@pytest.fixture(scope="module")
def pipe():
    return ldm_pipeline(diffusers_pipeline("sd1"))


def test_slerp_follows_the_great_circle_of_each_column_vector_and_its_ends():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    got = slerp(0.3, low, high)
    for c in range(4):
        for w in range(8):  # each (channel, column) vector along the rows, interpolated on its own circle
            a, b = low[c, :, w].numpy(), high[c, :, w].numpy()
            omega = math.acos(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
            expected = (math.sin(0.7 * omega) * a + math.sin(0.3 * omega) * b) / math.sin(omega)
            np.testing.assert_allclose(got[c, :, w].numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(slerp(0.0, low, high), low) and torch.allclose(slerp(1.0, low, high), high, atol=1e-12)
    # Nearly parallel on average: A1111 mixes linearly, with the weight t on low.
    torch.testing.assert_close(slerp(0.25, low, low * 1.001), low * 0.25 + low * 1.001 * 0.75)


def test_strength_zero_is_the_plain_image_and_one_is_the_variation_seeds_image(pipe):
    plain = pipe("a red circle", seed=3, output_type="pt", **SMALL).images
    assert torch.equal(pipe("a red circle", seed=3, subseed=9, subseed_strength=0.0, output_type="pt", **SMALL).images, plain)
    full = pipe("a red circle", seed=3, subseed=9, subseed_strength=1.0, output_type="pt", **SMALL).images
    assert torch.equal(full, pipe("a red circle", seed=9, output_type="pt", **SMALL).images)


def test_a_partial_strength_starts_from_the_interpolated_noise_image_by_image(pipe):
    shape = (2, 4, 8, 8)
    # Every image keeps the seed (A1111's rule with variation seeds on); only the variation seeds count up.
    noise, toward = randn(shape, seed_generators(3, 1) + seed_generators(3, 1)), randn(shape, seed_generators(20, 2))
    start = torch.stack([slerp(0.4, a, b) for a, b in zip(noise, toward)])
    result = pipe("a red circle", seed=3, subseed=20, subseed_strength=0.4, num_images_per_prompt=2, output_type="pt", **SMALL)
    expected = pipe("a red circle", latents=start, num_images_per_prompt=2, output_type="pt", **SMALL).images
    assert torch.equal(result.images, expected)
    assert result.seeds == [3, 3]
    extras = [params.extra for params in result.parameters]
    assert [(e["Variation seed"], e["Variation seed strength"]) for e in extras] == [("20", "0.4"), ("21", "0.4")]
    assert "Variation seed" not in pipe("a red circle", seed=3, output_type="pt", **SMALL).parameters[0].extra


def test_a_random_variation_seed_is_drawn_and_reported_and_bad_strengths_name_the_field(pipe):
    result = pipe("a red circle", seed=3, subseed=-1, subseed_strength=0.5, output_type="pt", **SMALL)
    drawn = int(result.parameters[0].extra["Variation seed"])
    again = pipe("a red circle", seed=3, subseed=drawn, subseed_strength=0.5, output_type="pt", **SMALL)
    assert torch.equal(again.images, result.images)
    with pytest.raises(SettingError, match="drop one"):
        pipe("a red circle", latents=torch.zeros(1, 4, 8, 8), subseed=2, subseed_strength=0.5, **SMALL)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(SettingError, match="subseed_strength"):
            pipe("a red circle", subseed_strength=bad, **SMALL)


def test_cli_variation_seed_flags(tmp_path, capsys):
    from ldm.cli import main

    out = tmp_path / "out"
    argv = ["txt2img", "a red circle", "--seed", "5", "--subseed", "7", "--subseed-strength", "0.25", "--num-images", "2",
            "--batch-size", "1", "--steps", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    extras = [parse_parameters(_infotext(path)).extra for path in sorted(out.iterdir())]
    assert [(e["Variation seed"], e["Variation seed strength"]) for e in extras] == [("7", "0.25"), ("8", "0.25")]
    assert [path.name for path in sorted(out.iterdir())] == ["00000-5.png", "00001-5.png"]  # one seed, two variations
    assert main(["txt2img", "a red circle", "--subseed-strength", "2", "--out", str(out)]) == 2
    assert "--subseed-strength" in capsys.readouterr().err


def _infotext(path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.info["parameters"]
