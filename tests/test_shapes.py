"""The shapes dataset generator and the deterministic pixel scorer."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ldm.errors import InputError
from support.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    all_scenes,
    generate,
    parse_caption,
    random_sample,
    render,
)
from support.shapes_score import accuracy, analyze, expected

CAPTION = re.compile(
    r"^an? (?:(small|large) )?(\w+) (\w+)(?: in the (top left|top right|bottom left|bottom right|center))?"
    r" on an? (\w+) background$"
)


def _degrade(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """3x3 box blur plus Gaussian pixel noise: what a slightly soft generated image looks like."""
    f = image.astype(np.float64)
    padded = np.pad(f, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = f.shape[:2]
    blurred = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.clip(blurred + rng.normal(0, sigma, blurred.shape), 0, 255)


def test_vocabulary_covers_the_issue():
    assert {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"} <= set(COLORS)
    assert {"circle", "square", "triangle"} <= set(SHAPES) and len(SHAPES) >= 4
    assert set(SIZES) == {"small", "large"}
    assert set(POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}


def test_generation_is_deterministic_and_prefix_stable():
    a = generate(12, seed=3, resolution=32)
    b = generate(12, seed=3, resolution=32)
    c = generate(5, seed=3, resolution=32)
    d = generate(12, seed=4, resolution=32)
    for x, y in zip(a, b):
        assert x.caption == y.caption and x.scene == y.scene and np.array_equal(x.image, y.image)
    for x, y in zip(a, c):
        assert np.array_equal(x.image, y.image)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, d))


def test_captions_follow_the_grammar_and_describe_the_scene():
    samples = generate(300, seed=0, resolution=32)
    seen_size, seen_position, seen_short = False, False, False
    for s in samples:
        match = CAPTION.match(s.caption)
        assert match, s.caption
        size, color, shape, position, background = match.groups()
        assert (color, shape, background) == (s.scene.color, s.scene.shape, s.scene.background)
        assert size in (None, s.scene.size) and position in (None, s.scene.position)
        words = s.caption.split()
        for article, word in zip(words, words[1:]):
            if article in ("a", "an"):
                assert article == ("an" if word[0] in "aeiou" else "a"), s.caption
        seen_size |= size is not None
        seen_position |= position is not None
        seen_short |= size is None and position is None
        assert parse_caption(s.caption) == {
            k: v for k, v in expected(s.scene).items() if k in ("color", "shape", "background") or v in s.caption
        }
    assert seen_size and seen_position and seen_short


def test_shape_and_background_always_differ():
    assert all(s.color != s.background for s in all_scenes())
    assert all(s.scene.color != s.scene.background for s in generate(200, seed=1, resolution=16))


def test_held_out_pairs_never_in_training_split():
    assert HELD_OUT_PAIRS and all(c in COLORS and s in SHAPES for c, s in HELD_OUT_PAIRS)
    train = generate(2000, seed=0, resolution=16)
    assert not any((s.scene.color, s.scene.shape) in HELD_OUT_PAIRS for s in train)
    assert not any((s.color, s.shape) in HELD_OUT_PAIRS for s in all_scenes("train"))
    held = [random_sample(0, i, 16, split="held_out") for i in range(50)]
    assert all((s.scene.color, s.scene.shape) in HELD_OUT_PAIRS for s in held)
    # Every colour and every shape still occurs in training on its own.
    assert {s.color for s in all_scenes("train")} == set(COLORS)
    assert {s.shape for s in all_scenes("train")} == set(SHAPES)


def test_render_draws_the_shape_where_it_says():
    scene = Scene("red", "square", "blue", "large", "top left")
    image = render(scene, 64)
    assert tuple(image[0, -1]) == COLORS["blue"] and tuple(image[-1, 0]) == COLORS["blue"]
    cx, cy = (int(v * 64) for v in POSITIONS["top left"])
    assert tuple(image[cy, cx]) == COLORS["red"]
    fraction = (np.abs(image.astype(int) - COLORS["red"]).sum(-1) < 10).mean()
    assert fraction == pytest.approx(SIZES["large"] ** 2, rel=0.1)


@pytest.mark.parametrize("resolution", [64, 128])
def test_scorer_reads_every_clean_image_exactly(resolution):
    samples = generate(120, seed=7, resolution=resolution) + generate(40, seed=7, resolution=resolution, split="held_out")
    readings = [analyze(s.image) for s in samples]
    assert accuracy(readings, [expected(s.scene) for s in samples])["all"] == 1.0


def test_scorer_reads_every_scene_of_the_grid():
    scenes = all_scenes()[::7]
    readings = [analyze(render(s, 64)) for s in scenes]
    assert accuracy(readings, [expected(s) for s in scenes])["all"] == 1.0


def test_scorer_is_robust_to_blur_and_noise():
    rng = np.random.default_rng(0)
    samples = generate(150, seed=11, resolution=64)
    readings = [analyze(_degrade(s.image, rng, sigma=10.0)) for s in samples]
    assert accuracy(readings, [expected(s.scene) for s in samples])["all"] == 1.0


def test_scorer_catches_wrong_images():
    scene = Scene("green", "circle", "white", "small", "bottom right")
    for wrong, attribute in [
        (Scene("green", "triangle", "white", "small", "bottom right"), "shape"),
        (Scene("green", "diamond", "white", "small", "bottom right"), "shape"),
        (Scene("green", "circle", "white", "large", "bottom right"), "size"),
        (Scene("green", "circle", "white", "small", "top left"), "position"),
        (Scene("yellow", "circle", "white", "small", "bottom right"), "color"),
        (Scene("green", "circle", "black", "small", "bottom right"), "background"),
    ]:
        result = accuracy([analyze(render(wrong, 64))], [expected(scene)])
        assert result[attribute] == 0.0 and result["all"] == 0.0
        assert all(v == 1.0 for k, v in result.items() if k not in (attribute, "all"))


def test_blank_image_has_no_shape():
    blank = np.full((64, 64, 3), COLORS["purple"], dtype=np.uint8)
    reading = analyze(blank)
    assert reading.background == "purple" and reading.shape is None and reading.color is None


def test_accuracy_skips_attributes_a_prompt_leaves_out():
    scene = Scene("red", "circle", "blue", "large", "center")
    target = {k: v for k, v in expected(scene).items() if k not in ("size", "position")}
    result = accuracy([analyze(render(Scene("red", "circle", "blue", "small", "top left"), 64))], [target])
    assert "size" not in result and "position" not in result and result["all"] == 1.0


def test_parse_caption_rejects_other_text():
    with pytest.raises(InputError):
        parse_caption("a photo of a cat")
    with pytest.raises(InputError):
        parse_caption("a red circle on blue")
