"""The captioned shapes dataset that the default model is trained on.

Every image is one flat-coloured shape on a plain background. A ``Scene`` names
what is drawn (shape colour, shape, background colour, size, position); the
caption follows ``a {size} {color} {shape} in the {position} on a {color}
background`` with the size and the position each left out at random, so that
short prompts such as ``a red circle on a blue background`` are in
distribution. Everything is deterministic from a seed: sample ``i`` of a seed
is drawn from its own generator ``(seed, i)``, so it does not depend on how
many samples are asked for.

A few colour-shape pairs (``HELD_OUT_PAIRS``) never occur in the training split;
the evaluation draws them from the ``held_out`` split to measure whether the
model composes colours and shapes it has only seen apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ldm.errors import InputError

# Palette in RGB. The closest pair (orange, yellow) is still 81 apart, so a
# pixel's nearest entry is unambiguous for the scorer in support.shapes_score.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Side of the shape's bounding box as a fraction of the image width.
SIZES: dict[str, float] = {"small": 0.26, "large": 0.42}
# Centre of the shape's bounding box, (x, y) as fractions of the image size.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.26, 0.26),
    "top right": (0.74, 0.26),
    "bottom left": (0.26, 0.74),
    "bottom right": (0.74, 0.74),
    "center": (0.5, 0.5),
}
# Random variation inside one scene: centre shift (fraction of the image) and
# relative size change. Bounded so a large shape at a corner stays in the image.
POSITION_JITTER = 0.025
SIZE_JITTER = 0.06
# Colour-shape pairs that never appear in training (each colour and each shape still does).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("blue", "square"), ("yellow", "triangle"), ("purple", "circle"), ("orange", "diamond")}
)
SUPERSAMPLE = 4  # sub-pixels per side used to anti-alias the edges

Split = Literal["train", "held_out", "all"]


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    color: str  # shape colour, a key of COLORS
    shape: str  # a member of SHAPES
    background: str  # background colour, a key of COLORS, never equal to ``color``
    size: str  # a key of SIZES
    position: str  # a key of POSITIONS

    def caption(self, with_size: bool = True, with_position: bool = True) -> str:
        """The caption, optionally without the size and the position phrase."""
        words = ([self.size] if with_size else []) + [self.color, self.shape]
        text = f"{_article(words[0])} {' '.join(words)}"
        if with_position:
            text += f" in the {self.position}"
        return f"{text} on {_article(self.background)} {self.background} background"


@dataclass(frozen=True)
class Sample:
    """A rendered scene: ``image`` is (H, W, 3) uint8 RGB."""

    scene: Scene
    caption: str
    image: np.ndarray


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_scenes(split: Split = "all") -> list[Scene]:
    """Every scene of a split, in a fixed order."""
    scenes = [
        Scene(color, shape, background, size, position)
        for color in COLORS
        for shape in SHAPES
        for background in COLORS
        for size in SIZES
        for position in POSITIONS
        if background != color
    ]
    return [s for s in scenes if _in_split(s, split)]


def _in_split(scene: Scene, split: Split) -> bool:
    held_out = (scene.color, scene.shape) in HELD_OUT_PAIRS
    return split == "all" or held_out == (split == "held_out")


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption names (``color``, ``shape``, ``background`` and maybe ``size``, ``position``).

    Inverse of ``Scene.caption``; raises ``InputError`` for text not in that grammar.
    """
    words = text.strip().lower().split()
    found: dict[str, str] = {}
    if not words or words[0] not in ("a", "an"):
        raise InputError(f"caption {text!r} must start with 'a' or 'an'; use the form 'a red circle on a blue background'")
    rest = words[1:]
    if rest and rest[0] in SIZES:
        found["size"] = rest.pop(0)
    if len(rest) < 2 or rest[0] not in COLORS or rest[1] not in SHAPES:
        raise InputError(f"caption {text!r} must name a colour then a shape, e.g. 'a red circle'")
    found["color"], found["shape"] = rest[0], rest[1]
    rest = rest[2:]
    if rest[:2] == ["in", "the"]:
        for name in sorted(POSITIONS, key=len, reverse=True):
            if rest[2 : 2 + len(name.split())] == name.split():
                found["position"] = name
                rest = rest[2 + len(name.split()) :]
                break
    if len(rest) != 4 or rest[0] != "on" or rest[1] not in ("a", "an") or rest[2] not in COLORS or rest[3] != "background":
        raise InputError(f"caption {text!r} must end with 'on a <colour> background'")
    found["background"] = rest[2]
    return found


def render(
    scene: Scene, resolution: int, offset: tuple[float, float] = (0.0, 0.0), scale: float = 1.0
) -> np.ndarray:
    """Draw ``scene`` as a (resolution, resolution, 3) uint8 image with anti-aliased edges.

    ``offset`` shifts the centre (fractions of the image), ``scale`` multiplies the size.
    """
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + offset[0], cy + offset[1]
    side = SIZES[scene.size] * scale
    coverage = shape_coverage(scene.shape, cx, cy, side, resolution, resolution)
    fg = np.asarray(COLORS[scene.color], dtype=np.float64)
    bg = np.asarray(COLORS[scene.background], dtype=np.float64)
    image = bg + coverage[..., None] * (fg - bg)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def shape_coverage(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel inside ``shape`` (bounding box ``side`` wide, centred at ``cx, cy``).

    Coordinates are fractions of the width (x) and of the height (y); the
    result is (height, width) floats in [0, 1], from SUPERSAMPLE² samples per pixel.
    """
    n = SUPERSAMPLE
    ys = (np.arange(height * n) + 0.5) / (height * n)
    xs = (np.arange(width * n) + 0.5) / (width * n)
    u = xs[None, :] - cx
    v = ys[:, None] - cy
    h = side / 2
    if shape == "circle":
        inside = u**2 + v**2 <= h**2
    elif shape == "square":
        inside = (np.abs(u) <= h) & (np.abs(v) <= h)
    elif shape == "diamond":
        inside = np.abs(u) + np.abs(v) <= h
    elif shape == "triangle":
        # Apex at the top middle, base along the bottom edge: half-width grows by 1/2 per unit of depth.
        depth = v + h
        inside = (depth >= 0) & (v <= h) & (np.abs(u) <= depth / 2)
    else:
        raise InputError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return inside.reshape(height, n, width, n).mean(axis=(1, 3))


def random_scene(rng: np.random.Generator, split: Split = "train") -> Scene:
    """A uniformly drawn scene of ``split`` (rejection sampling over the full product)."""
    colors = list(COLORS)
    while True:
        color, background = rng.choice(len(colors), size=2, replace=False)
        scene = Scene(
            color=colors[color],
            shape=SHAPES[rng.integers(len(SHAPES))],
            background=colors[background],
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        )
        if _in_split(scene, split):
            return scene


def random_sample(seed: int, index: int, resolution: int, split: Split = "train") -> Sample:
    """Sample ``index`` of the stream ``seed``: a scene, a caption with random parts left out, the image."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng, split)
    caption = scene.caption(with_size=bool(rng.random() < 0.5), with_position=bool(rng.random() < 0.5))
    offset = tuple(rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2))
    scale = 1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return Sample(scene, caption, render(scene, resolution, offset, scale))


def generate(count: int, seed: int, resolution: int, split: Split = "train") -> list[Sample]:
    """``count`` samples of the stream ``seed`` (see ``random_sample``)."""
    if count < 0 or resolution < 16:
        raise InputError(f"need count >= 0 and resolution >= 16, got {count} and {resolution}")
    return [random_sample(seed, i, resolution, split) for i in range(count)]
