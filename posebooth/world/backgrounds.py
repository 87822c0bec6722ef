"""Backgrounds of the procedural world, one per context a DreamBench prompt names, each with seeded
variation (horizon height, shades, where the details go) so that no background repeats pixel for pixel.

A context draws on an ``S`` x ``S`` canvas (``S`` is the supersampled size) given its horizon ``hz``, the
canvas row where the ground starts; the subject stands below it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from posebooth.world.drawing import RGB, disc, jitter, shade, star


def gradient(width: int, height: int, top: RGB, bottom: RGB) -> Image.Image:
    """A vertical gradient (a one-pixel column stretched sideways: ten times faster than numpy)."""
    t = np.linspace(0, 1, max(1, height))[:, None, None]
    column = (1 - t) * np.array(top) + t * np.array(bottom)  # (height, 1, 3)
    return Image.fromarray(column.astype(np.uint8)).resize((width, max(1, height)), Image.Resampling.NEAREST)


def _sky_and_ground(
    rng: np.random.Generator, S: int, hz: int, sky: tuple[RGB, RGB], ground: tuple[RGB, RGB], amount: float = 14
) -> Image.Image:
    """A sky gradient down to ``hz`` and a ground gradient below it, both shades jittered."""
    img = gradient(S, hz, jitter(sky[0], rng, amount), jitter(sky[1], rng, amount))
    canvas = Image.new("RGB", (S, S))
    canvas.paste(img, (0, 0))
    canvas.paste(gradient(S, S - hz, jitter(ground[0], rng, amount), jitter(ground[1], rng, amount)), (0, hz))
    return canvas


_BLUE_SKY = ((80, 145, 225), (185, 215, 242))


def _clouds(d: ImageDraw.ImageDraw, rng: np.random.Generator, S: int, hz: int, n: int) -> None:
    for _ in range(n):
        x, y, r = rng.uniform(0, S), rng.uniform(0.05 * S, max(0.06 * S, hz - 0.12 * S)), rng.uniform(0.04, 0.07) * S
        for dx in (-1.1, 0.0, 1.1):
            disc(d, (x + dx * r, y + (0.25 * r if dx else 0)), r * (0.8 if dx else 1.05), (248, 248, 250))


def studio(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """A plain backdrop: a neutral sweep, lighter at the top, with a slightly darker floor."""
    base = jitter([(205, 205, 208), (215, 206, 192), (188, 196, 210), (172, 172, 176)][rng.integers(4)], rng, 10)
    return _sky_and_ground(rng, S, hz, (shade(base, 1.15), base), (shade(base, 0.93), shade(base, 0.78)), 4)


def beach(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """Sky, a band of sea with a line of surf, then sand."""
    sea = int(hz + rng.uniform(0.07, 0.16) * S)
    img = _sky_and_ground(rng, S, hz, _BLUE_SKY, ((236, 214, 160), (222, 190, 132)))
    img.paste(gradient(S, sea - hz, jitter((30, 95, 170), rng, 15), jitter((45, 140, 195), rng, 15)), (0, hz))
    d = ImageDraw.Draw(img)
    xs = np.linspace(0, S, 9)
    surf = [(x, sea + rng.uniform(-0.012, 0.012) * S) for x in xs]
    d.line(surf, fill=(250, 250, 245), width=max(1, int(0.022 * S)), joint="curve")
    if rng.random() < 0.6:
        disc(d, (rng.uniform(0.1, 0.9) * S, rng.uniform(0.08, 0.2) * S), 0.06 * S, (255, 225, 90))
    _clouds(d, rng, S, hz, int(rng.integers(0, 3)))
    return img


def snow(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """A pale sky, snowy hills with dark pines, white ground and falling flakes."""
    img = _sky_and_ground(rng, S, hz, ((150, 170, 200), (212, 222, 235)), ((244, 247, 252), (214, 224, 240)), 8)
    d = ImageDraw.Draw(img)
    for shade_, lift in (((225, 232, 244), 0.16), ((236, 241, 250), 0.08)):
        xs = np.linspace(-0.1, 1.1, 6) * S
        d.polygon([(0, hz)] + [(x, hz - rng.uniform(0.2, 1.0) * lift * S) for x in xs] + [(S, hz)], fill=shade_)
    for _ in range(int(rng.integers(2, 6))):
        x, h = rng.uniform(0, S), rng.uniform(0.12, 0.26) * S
        y = hz + rng.uniform(-0.01, 0.03) * S
        green = jitter((30, 75, 50), rng, 10)
        for k in range(3):  # three stacked tiers, a white edge on each
            top, w = y - h * (0.35 + 0.3 * k), h * (0.32 - 0.07 * k)
            d.polygon([(x - w, top + 0.4 * h), (x + w, top + 0.4 * h), (x, top)], fill=green)
            d.line([(x - w, top + 0.4 * h), (x + w, top + 0.4 * h)], fill=(240, 244, 250), width=max(1, int(0.01 * S)))
    for _ in range(30):
        disc(d, (rng.uniform(0, S), rng.uniform(0, S)), rng.uniform(0.004, 0.009) * S, (252, 252, 255))
    return img


def jungle(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """Dense green: dark foliage, trunks, big leaves in several greens, a mossy floor."""
    img = _sky_and_ground(rng, S, hz, ((22, 62, 30), (35, 90, 38)), ((62, 82, 32), (40, 58, 24)), 10)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 6))):
        x, w = rng.uniform(0, S), rng.uniform(0.03, 0.07) * S
        d.rectangle([x - w / 2, 0, x + w / 2, hz + 0.02 * S], fill=jitter((75, 52, 30), rng, 12))
    greens = ((40, 125, 40), (65, 155, 50), (28, 100, 48), (90, 175, 60), (50, 140, 80))
    for _ in range(36):
        c = np.array([rng.uniform(0, S), rng.uniform(-0.05, 1.0) * (hz + 0.1 * S)])
        length, angle = rng.uniform(0.07, 0.15) * S, rng.uniform(0, np.pi)
        along, across = np.array([np.cos(angle), np.sin(angle)]) * length, np.array([-np.sin(angle), np.cos(angle)])
        w = across * length * 0.32
        leaf = [tuple(c - along), tuple(c - w), tuple(c + along), tuple(c + w)]
        d.polygon(leaf, fill=jitter(greens[rng.integers(len(greens))], rng, 15))
    for _ in range(int(rng.integers(2, 5))):  # hanging vines
        x = rng.uniform(0, S)
        d.line(
            [(x, 0), (x + rng.uniform(-0.05, 0.05) * S, rng.uniform(0.2, 0.5) * S)],
            fill=(50, 110, 35),
            width=max(1, int(0.012 * S)),
        )
    return img


def city(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """A skyline of tall buildings with rows of lit windows, over a grey street."""
    sky = _BLUE_SKY if rng.random() < 0.7 else ((240, 160, 110), (250, 215, 170))  # day or dusk
    img = _sky_and_ground(rng, S, hz, sky, ((125, 125, 130), (92, 92, 98)), 10)
    d = ImageDraw.Draw(img)
    greys = ((95, 100, 115), (130, 135, 150), (160, 150, 135), (75, 85, 110), (115, 115, 120))
    for layer, (lo, hi) in enumerate(((0.25, 0.55), (0.12, 0.35))):  # far then near row of buildings
        x = rng.uniform(-0.1, 0) * S
        while x < S:
            w, h = rng.uniform(0.09, 0.2) * S, rng.uniform(lo, hi) * S
            colour = shade(jitter(greys[rng.integers(len(greys))], rng, 10), 0.85 if layer == 0 else 1.0)
            d.rectangle([x, hz - h, x + w, hz], fill=colour)
            window = (235, 220, 150) if rng.random() < 0.5 else (190, 215, 235)
            for y in np.arange(hz - h + 0.035 * S, hz - 0.03 * S, 0.055 * S):
                d.rectangle([x + 0.15 * w, y, x + 0.85 * w, y + 0.022 * S], fill=shade(window, 0.9 + 0.1 * layer))
            x += w + rng.uniform(0.0, 0.03) * S
    d.rectangle([0, hz, S, hz + 0.03 * S], fill=(165, 165, 168))  # the kerb
    return img


def grass(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """Blue sky, green grass, and sunflowers on stems to both sides of the middle."""
    img = _sky_and_ground(rng, S, hz, _BLUE_SKY, ((95, 175, 60), (55, 135, 40)), 14)
    d = ImageDraw.Draw(img)
    _clouds(d, rng, S, hz, int(rng.integers(1, 3)))
    for _ in range(24):  # tufts
        x, y = rng.uniform(0, S), rng.uniform(hz, S)
        d.line(
            [(x, y), (x + rng.uniform(-0.01, 0.01) * S, y - 0.025 * S)],
            fill=(40, 110, 30),
            width=max(1, int(0.008 * S)),
        )
    flowers = int(rng.integers(4, 8))
    for i in range(flowers):
        side = -1 if i % 2 == 0 else 1
        x = (0.5 + side * rng.uniform(0.22, 0.48)) * S
        y = rng.uniform(hz - 0.12 * S, S * 0.85)
        r = (0.035 + 0.06 * (y - hz + 0.12 * S) / S) * S  # nearer (lower) flowers are bigger
        d.line([(x, y), (x, min(S, y + 4 * r))], fill=(45, 120, 35), width=max(1, int(0.25 * r)))
        d.polygon(star((x, y), r, points=10, inner=0.7, angle=rng.uniform(0, 1)), fill=jitter((250, 200, 30), rng, 8))
        disc(d, (x, y), 0.45 * r, (110, 65, 25))
    return img


def water(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """Sky, a far shore, and open water with light ripples growing towards the viewer."""
    img = _sky_and_ground(rng, S, hz, _BLUE_SKY, ((70, 140, 200), (25, 80, 150)), 14)
    d = ImageDraw.Draw(img)
    shore = rng.uniform(0.015, 0.045) * S
    d.rectangle([0, hz - shore, S, hz], fill=jitter((70, 115, 70), rng, 15))
    for _ in range(28):
        y = rng.uniform(hz + 0.02 * S, S)
        length = (0.03 + 0.1 * (y - hz) / S) * S
        x = rng.uniform(0, S)
        d.line([(x - length / 2, y), (x + length / 2, y)], fill=(150, 200, 235), width=max(1, int(0.008 * S)))
    return img


def wood(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """A painted wall, a skirting board, and a floor of wooden planks narrowing towards the wall."""
    wall = ((236, 226, 200), (222, 218, 210), (200, 216, 222), (230, 205, 190))[rng.integers(4)]
    plank = jitter((170, 112, 62), rng, 22)
    img = _sky_and_ground(rng, S, hz, (shade(wall, 1.05), wall), (shade(plank, 0.92), plank), 8)
    d = ImageDraw.Draw(img)
    d.rectangle([0, hz - 0.03 * S, S, hz], fill=(245, 242, 236) if rng.random() < 0.6 else shade(plank, 0.6))
    rows = int(rng.integers(6, 10))
    edges = [hz + (S - hz) * (k / rows) ** 1.5 for k in range(1, rows + 1)]
    line = shade(plank, 0.62)
    top = hz
    for y in edges:  # one plank row between top and y, with a butt joint somewhere along it
        d.line([(0, y), (S, y)], fill=line, width=max(1, int(0.006 * S)))
        x = rng.uniform(0, S)
        d.line([(x, top), (x, y)], fill=line, width=max(1, int(0.005 * S)))
        top = y
    return img


def fabric(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """Pink cloth filling the frame, with soft folds in lighter and darker pink."""
    base = jitter((238, 150, 188), rng, 14)
    img = gradient(S, S, shade(base, 1.08), shade(base, 0.9))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 7))):  # a fold: a broad soft band with a bright crest along one edge
        x0, tilt, width = rng.uniform(-0.1, 1.1) * S, rng.uniform(-0.4, 0.4) * S, rng.uniform(0.05, 0.12) * S
        ys = np.linspace(-0.1, 1.1, 7) * S
        points = [(x0 + tilt * y / S + rng.uniform(-0.04, 0.04) * S, y) for y in ys]
        d.line(points, fill=shade(base, rng.uniform(0.8, 0.9)), width=int(width), joint="curve")
        crest = [(x + 0.5 * width, y) for x, y in points]
        d.line(crest, fill=shade(base, 1.18), width=max(1, int(0.25 * width)), joint="curve")
    return img


def mountain(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """Sky, a big snow-capped peak (and maybe a lower one), an olive alpine meadow in front."""
    img = _sky_and_ground(rng, S, hz, _BLUE_SKY, ((140, 150, 85), (100, 112, 58)), 14)
    d = ImageDraw.Draw(img)
    for k in range(int(rng.integers(1, 3))):  # the big peak first, a lower one in front of it
        px, w = rng.uniform(0.15, 0.85) * S, rng.uniform(0.45, 0.7) * S
        h = rng.uniform(0.65, 0.9) * hz * (1.0 if k == 0 else 0.6)
        rock = jitter((100, 106, 132), rng, 14)
        d.polygon([(px - w, hz), (px, hz - h), (px + w, hz)], fill=rock)
        cap = 0.3  # the top 30 % is snow
        snow_line = hz - h * (1 - cap)
        d.polygon([(px - w * cap, snow_line), (px, hz - h), (px + w * cap, snow_line)], fill=(245, 247, 252))
    return img


def house(rng: np.random.Generator, S: int, hz: int) -> Image.Image:
    """Sky and a pale lawn with one big blue house to a side, under a red roof, a path from its door."""
    img = _sky_and_ground(rng, S, hz, _BLUE_SKY, ((150, 190, 88), (115, 160, 62)), 14)
    d = ImageDraw.Draw(img)
    cx = (rng.uniform(0.18, 0.32) if rng.random() < 0.5 else rng.uniform(0.68, 0.82)) * S
    w, h = rng.uniform(0.2, 0.28) * S, rng.uniform(0.22, 0.32) * S
    base = hz + 0.02 * S
    d.polygon(
        [(cx - 0.15 * w, base), (cx + 0.15 * w, base), (cx + 0.6 * w, S), (cx - 0.6 * w, S)], fill=(200, 190, 170)
    )
    d.rectangle([cx - w, base - h, cx + w, base], fill=jitter((55, 105, 205), rng, 18))
    roof = [(cx - 1.15 * w, base - h), (cx, base - h - 0.8 * w), (cx + 1.15 * w, base - h)]
    d.polygon(roof, fill=jitter((165, 50, 40), rng, 15))
    d.rectangle([cx - 0.15 * w, base - 0.55 * h, cx + 0.15 * w, base], fill=(250, 250, 245))  # door
    for side in (-1, 1):
        x = cx + side * 0.58 * w
        d.rectangle([x - 0.18 * w, base - 0.8 * h, x + 0.18 * w, base - 0.5 * h], fill=(240, 240, 200))
    return img


@dataclass(frozen=True)
class Context:
    """A background and the words a caption uses for it (DreamBench's prompt wording)."""

    name: str
    phrase: str  # "" for the plain studio: a caption without a place
    draw: Callable[[np.random.Generator, int, int], Image.Image]
    water: bool = False  # subjects float (a ripple ring) instead of casting a shadow


CONTEXTS: dict[str, Context] = {
    c.name: c
    for c in (
        Context("studio", "", studio),
        Context("beach", "on the beach", beach),
        Context("snow", "in the snow", snow),
        Context("jungle", "in the jungle", jungle),
        Context("city", "with a city in the background", city),
        Context("grass", "on top of green grass with sunflowers around it", grass),
        Context("water", "floating on top of water", water, water=True),
        Context("wood", "on top of a wooden floor", wood),
        Context("fabric", "on top of pink fabric", fabric),
        Context("mountain", "with a mountain in the background", mountain),
        Context("house", "with a blue house in the background", house),
    )
}


def ground_mark(d: ImageDraw.ImageDraw, context: Context, centre: tuple[float, float], width: float) -> None:
    """Under a subject: a soft shadow, or ripple rings on water. ``d`` must be an RGBA draw."""
    x, y = centre
    if context.water:
        for k, alpha in ((1.0, 170), (1.45, 110)):
            rx, ry = width * 0.6 * k, width * 0.12 * k
            d.ellipse([x - rx, y - ry, x + rx, y + ry], outline=(225, 240, 250, alpha), width=max(1, int(width * 0.03)))
    else:
        d.ellipse([x - width * 0.55, y - width * 0.09, x + width * 0.55, y + width * 0.09], fill=(0, 0, 0, 60))
