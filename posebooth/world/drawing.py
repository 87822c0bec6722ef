"""Colours and drawing primitives of the procedural world: a named palette, and silhouettes built from
rounded bars, discs and polygons, outlined so that a subject stays readable on any background at 64 px.

Everything is drawn on a canvas ``SS`` times the final size and downsampled with LANCZOS afterwards (as
``scripts/make_sample_subject.py`` does), so coordinates here are canvas pixels, floats allowed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageDraw

SS = 4  # supersampling factor: shapes are drawn at SS x the output size, then downsampled

RGB = tuple[int, int, int]
Point = tuple[float, float]

# Caption colour words -> RGB, spread in hue and lightness so that each stays distinct after a 4x
# downsample to 64 px: no two closer than 85 in RGB distance (the nearest: purple-grey, orange-yellow).
PALETTE: dict[str, RGB] = {
    "red": (210, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (245, 215, 40),
    "green": (45, 160, 60),
    "blue": (40, 85, 215),
    "purple": (135, 55, 180),
    "pink": (245, 135, 190),
    "white": (242, 242, 238),
    "grey": (130, 130, 136),
    "black": (32, 32, 36),
    "brown": (125, 78, 38),
}
# The colour of emblems, patterns and eyes on a body of each colour: light on dark bodies, dark on light.
CONTRAST: dict[str, RGB] = {
    "red": (250, 250, 245),
    "orange": (250, 250, 245),
    "yellow": (40, 40, 48),
    "green": (250, 250, 245),
    "blue": (250, 250, 245),
    "purple": (250, 250, 245),
    "pink": (40, 40, 48),
    "white": (40, 40, 48),
    "grey": (250, 250, 245),
    "black": (250, 250, 245),
    "brown": (250, 250, 245),
}
OUTLINE: RGB = (22, 22, 26)

# A silhouette part, in canvas pixels: ("bar", a, b, width) a segment with round caps; ("disc", c, r);
# ("ellipse", c, rx, ry); ("poly", points, pad) a polygon grown by ``pad`` with rounded corners.
Part = tuple


def shade(rgb: RGB, factor: float) -> RGB:
    """``rgb`` darkened (factor < 1) or lightened towards white (factor > 1)."""
    if factor <= 1:
        return tuple(int(v * factor) for v in rgb)
    return tuple(int(v + (255 - v) * (factor - 1)) for v in rgb)


def jitter(rgb: RGB, rng: np.random.Generator, amount: float) -> RGB:
    """``rgb`` with each channel moved by up to ``amount``, clipped to [0, 255] (seeded shade variation)."""
    return tuple(min(255, max(0, int(v + u))) for v, u in zip(rgb, rng.uniform(-amount, amount, 3), strict=True))


def mix(a: RGB, b: RGB, t: float) -> RGB:
    """The colour ``t`` of the way from ``a`` to ``b``."""
    return tuple(int(x + (y - x) * t) for x, y in zip(a, b, strict=True))


def disc(d: ImageDraw.ImageDraw, c: Point, r: float, fill) -> None:
    """A filled circle of radius ``r`` centred on ``c``."""
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fill)


def bar(d: ImageDraw.ImageDraw, a: Point, b: Point, width: float, fill) -> None:
    """A segment ``width`` thick with round caps (PIL lines have square ends)."""
    d.line([a, b], fill=fill, width=max(1, round(width)))
    disc(d, a, width / 2, fill)
    disc(d, b, width / 2, fill)


def star(c: Point, r: float, points: int = 5, inner: float = 0.45, angle: float = 0.0) -> list[Point]:
    """The outline of a star with ``points`` tips at radius ``r`` (inner corners at ``inner * r``)."""
    out = []
    for i in range(2 * points):
        a = angle - math.pi / 2 + i * math.pi / points
        rr = r if i % 2 == 0 else r * inner
        out.append((c[0] + rr * math.cos(a), c[1] + rr * math.sin(a)))
    return out


def _part(d: ImageDraw.ImageDraw, part: Part, grow: float, fill) -> None:
    kind = part[0]
    if kind == "bar":
        bar(d, part[1], part[2], part[3] + 2 * grow, fill)
    elif kind == "disc":
        disc(d, part[1], part[2] + grow, fill)
    elif kind == "ellipse":
        (x, y), rx, ry = part[1], part[2] + grow, part[3] + grow
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=fill)
    elif kind == "poly":
        points, pad = part[1], part[2] + grow
        d.polygon(points, fill=fill)
        if pad > 0:  # grow the polygon: a round-capped bar along every edge
            for a, b in zip(points, points[1:] + points[:1], strict=True):
                bar(d, a, b, 2 * pad, fill)
    else:
        raise ValueError(f"unknown silhouette part {kind!r}; expected bar, disc, ellipse or poly")


def silhouette(d: ImageDraw.ImageDraw, parts: list[Part], fill: RGB, outline: float) -> None:
    """Draw ``parts`` as one shape in ``fill`` with an ``outline``-wide dark rim around the union (all
    rims first, then all fills, so that no rim shows where two parts meet)."""
    if outline > 0:
        for part in parts:
            _part(d, part, outline, OUTLINE)
    for part in parts:
        _part(d, part, 0.0, fill)


def rotate(points: np.ndarray, degrees: float, centre: np.ndarray) -> np.ndarray:
    """(K, 2) points rotated by ``degrees`` (clockwise on screen, y down) about ``centre``."""
    a = math.radians(degrees)
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (points - centre) @ m.T + centre
