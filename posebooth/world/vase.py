"""The world's object without a skeleton: a vase, a lathe profile in one of three shapes, with a pattern.

Figure coordinates as for the other subjects: x from the vase's axis, y down from its rim (0) to its
foot (1), in units of its height.
"""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from posebooth.world.drawing import CONTRAST, PALETTE, bar, disc, shade, silhouette

SHAPES = ("round", "tall", "square")
PATTERNS = ("plain", "stripes", "dots", "zigzag")
# The lathe profile of each shape: heights y from rim to foot, and the half-width at each (figure heights).
_PROFILE = {
    "round": ((0.0, 0.06, 0.14, 0.24, 0.42, 0.62, 0.84, 1.0), (0.11, 0.10, 0.08, 0.10, 0.29, 0.33, 0.27, 0.15)),
    "tall": ((0.0, 0.05, 0.12, 0.34, 0.58, 0.84, 1.0), (0.13, 0.12, 0.08, 0.09, 0.17, 0.17, 0.12)),
    "square": ((0.0, 0.06, 0.10, 0.14, 0.94, 1.0), (0.21, 0.21, 0.18, 0.26, 0.26, 0.24)),
}


def width_at(shape: str, y: float) -> float:
    """The vase's half-width at figure height ``y``."""
    return float(np.interp(y, *_PROFILE[shape]))


def draw_vase(
    d: ImageDraw.ImageDraw, origin: tuple[float, float], colour: str, shape: str, pattern: str, unit: float
) -> None:
    """Draw the vase with its rim's centre at canvas point ``origin``, ``unit`` canvas pixels tall."""
    if shape not in _PROFILE:
        raise ValueError(f"unknown vase shape {shape!r}; expected one of {SHAPES}")
    ox, oy = origin

    def at(x: float, y: float) -> tuple[float, float]:
        return (ox + x * unit, oy + y * unit)

    ys = np.linspace(0, 1, 24)
    right = [at(w, y) for y, w in zip(ys, np.interp(ys, *_PROFILE[shape]), strict=True)]
    contour = right + [(2 * ox - x, y) for x, y in reversed(right)]  # mirrored about the axis
    fill, detail = PALETTE[colour], CONTRAST[colour]
    silhouette(d, [("poly", contour, 0.015 * unit)], fill, outline=0.018 * unit)
    top = width_at(shape, 0.0)
    d.ellipse([*at(-0.8 * top, -0.015), *at(0.8 * top, 0.035)], fill=shade(fill, 0.45))  # the opening
    if pattern == "stripes":
        for y0 in (0.45, 0.66):
            band = [at(width_at(shape, y), y) for y in (y0, y0 + 0.08)]
            band += [at(-width_at(shape, y), y) for y in (y0 + 0.08, y0)]
            d.polygon(band, fill=detail)
    elif pattern == "dots":
        for y in (0.48, 0.72):
            w = width_at(shape, y)
            for x in (-0.55, 0.0, 0.55):
                disc(d, at(x * w, y), 0.045 * unit, detail)
    elif pattern == "zigzag":
        ws = np.linspace(-1, 1, 7) * width_at(shape, 0.6) * 0.8
        points = [at(x, 0.6 + (0.05 if i % 2 else -0.05)) for i, x in enumerate(ws)]
        for a, b in zip(points, points[1:], strict=False):
            bar(d, a, b, 0.04 * unit, detail)
    elif pattern != "plain":
        raise ValueError(f"unknown vase pattern {pattern!r}; expected one of {PATTERNS}")
    # a highlight down the left side: what makes a flat shape read as a glazed pot
    w = width_at(shape, 0.55)
    bar(d, at(-0.6 * w, 0.38), at(-0.6 * w, 0.78), 0.035 * unit, shade(fill, 1.45))
