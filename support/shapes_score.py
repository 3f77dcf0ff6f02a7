"""A deterministic reading of a shapes image: background colour, shape colour, shape, size, position.

This is how the evaluation decides whether a generated image follows its
prompt, with no learned model in the loop:

1. Background: the border pixels vote for their nearest palette colour; the
   winner names the background and the median of its voters is its RGB value.
2. Foreground: pixels farther than half the palette's smallest gap from the
   background; the largest 4-connected region is the shape. Its pixels vote
   for the nearest palette colour other than the background.
3. Coverage: each pixel's fraction of shape colour, ``alpha``, is its
   projection on the background→shape colour segment, which undoes the
   anti-aliased (or blurred) edges.
4. Shape: for each candidate shape, the ideal shape whose area and centroid
   equal those of ``alpha`` is drawn, and the one overlapping ``alpha`` best
   (soft intersection over union) wins. Its bounding box gives the size
   (side against the mid point of the two sizes) and the position (nearest
   anchor).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from support.shapes import COLORS, POSITIONS, SHAPES, SIZES, Scene, shape_coverage

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)
_MIN_GAP = min(
    float(np.linalg.norm(_PALETTE[i] - _PALETTE[j])) for i in range(len(_PALETTE)) for j in range(i)
)
BORDER = 2  # pixels of each edge that vote for the background
MIN_SHAPE_FRACTION = 0.005  # a region smaller than this fraction of the image is no shape
ATTRIBUTES = ("background", "color", "shape", "size", "position")

# Area of each shape over the area of its bounding box, and the centroid's
# downward offset from the box centre in units of the side (only the triangle,
# whose centroid lies at 2/3 of its height).
_AREA_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "diamond": 0.0}


@dataclass(frozen=True)
class Reading:
    """What ``analyze`` sees in one image; ``None`` where there is no shape to read."""

    background: str
    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    overlap: float  # soft IoU of the winning ideal shape, 0 when there is no shape


def analyze(image: np.ndarray) -> Reading:
    """Read one (H, W, 3) uint8 or float [0, 255] RGB image (see the module docstring)."""
    pixels = np.asarray(image, dtype=np.float64)
    height, width = pixels.shape[:2]
    background, bg_rgb = _background(pixels)
    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    region = _largest_region(distance > _MIN_GAP / 2)
    if region.sum() < MIN_SHAPE_FRACTION * height * width:
        return Reading(background, None, None, None, None, 0.0)

    votes = _nearest_palette(pixels[region], exclude=background)
    color = Counter(votes).most_common(1)[0][0]
    fg_rgb = np.median(pixels[region][np.asarray(votes) == color], axis=0)

    alpha = _coverage(pixels, bg_rgb, fg_rgb) * _dilate(region)
    shape, overlap, side, cx, cy = _best_shape(alpha)
    size = "small" if side < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Reading(background, color, shape, size, position, overlap)


def _nearest_palette(rgb: np.ndarray, exclude: str | None = None) -> list[str]:
    distance = np.linalg.norm(rgb[:, None, :] - _PALETTE[None, :, :], axis=-1)
    if exclude is not None:
        distance[:, _PALETTE_NAMES.index(exclude)] = np.inf
    return [_PALETTE_NAMES[i] for i in distance.argmin(axis=1)]


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    b = BORDER
    border = np.concatenate(
        [
            pixels[:b].reshape(-1, 3),
            pixels[-b:].reshape(-1, 3),
            pixels[b:-b, :b].reshape(-1, 3),
            pixels[b:-b, -b:].reshape(-1, 3),
        ]
    )
    votes = np.asarray(_nearest_palette(border))
    name = Counter(votes.tolist()).most_common(1)[0][0]
    return name, np.median(border[votes == name], axis=0)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (flood fill; images are small)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, next_label = 0, 0, 1
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        labels[start] = next_label
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = next_label, size
        next_label += 1
    return labels == best_label if best_size else np.zeros_like(mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel (8-neighbourhood), to keep the soft edge pixels of the region."""
    grown = mask.copy()
    padded = np.pad(mask, 1)
    height, width = mask.shape
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def _coverage(pixels: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Per pixel ``a`` in [0, 1] with ``pixel ≈ bg + a (fg - bg)`` (least squares along the segment)."""
    axis = fg - bg
    a = ((pixels - bg) @ axis) / max(float(axis @ axis), 1e-6)
    return np.clip(a, 0.0, 1.0)


def _best_shape(alpha: np.ndarray) -> tuple[str, float, float, float, float]:
    """The ideal shape matching ``alpha`` best: (name, soft IoU, side, centre x, centre y) in image fractions."""
    height, width = alpha.shape
    area = alpha.sum() / (height * width)
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    mx = float((alpha.sum(axis=0) * xs).sum() / alpha.sum())
    my = float((alpha.sum(axis=1) * ys).sum() / alpha.sum())
    best = ("", -1.0, 0.0, 0.0, 0.0)
    for shape in SHAPES:
        side = float(np.sqrt(area / _AREA_RATIO[shape]))
        cy = my - _CENTROID_DROP[shape] * side
        ideal = shape_coverage(shape, mx, cy, side, height, width)
        overlap = float(np.minimum(alpha, ideal).sum() / max(np.maximum(alpha, ideal).sum(), 1e-9))
        if overlap > best[1]:
            best = (shape, overlap, side, mx, cy)
    return best


def expected(scene: Scene) -> dict[str, str]:
    """The reading a perfect image of ``scene`` gets, keyed like ``ATTRIBUTES``."""
    return {
        "background": scene.background,
        "color": scene.color,
        "shape": scene.shape,
        "size": scene.size,
        "position": scene.position,
    }


def accuracy(readings: list[Reading], targets: list[dict[str, str]]) -> dict[str, float]:
    """Fraction of images whose reading matches the target, per attribute the targets name.

    A target may leave out attributes (a prompt without size or position): those
    images do not count for that attribute. ``all`` is the fraction of images
    with every named attribute right.
    """
    if len(readings) != len(targets):
        raise ValueError(f"{len(readings)} readings for {len(targets)} targets")
    result: dict[str, float] = {}
    for attribute in ATTRIBUTES:
        pairs = [(getattr(r, attribute), t[attribute]) for r, t in zip(readings, targets) if attribute in t]
        if pairs:
            result[attribute] = sum(got == want for got, want in pairs) / len(pairs)
    if readings:
        result["all"] = sum(
            all(getattr(r, k) == v for k, v in t.items() if k in ATTRIBUTES) for r, t in zip(readings, targets)
        ) / len(readings)
    return result
