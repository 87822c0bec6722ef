"""The world's quadruped: a dog seen from the side, with its own skeleton in posebooth's custom format,
posed and drawn from its keypoints (the legs hang from the withers and the tail base, which lie on the
body's axis).

Figure coordinates: facing the image's right, x forwards from the middle of the body, y down from the
top of the ears (0) to under the paws (1), in units of the figure's height. Facing right the dog shows
its left side, so its ``left_*`` legs are the near ones; mirrored it faces left and shows its right.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import ImageDraw

from posebooth.poses import Skeleton
from posebooth.world.drawing import CONTRAST, PALETTE, Part, bar, disc, shade, silhouette

EARS = ("pointed", "round", "floppy")
PATTERNS = ("plain", "spots", "stripes")
BUILDS = ("normal", "long", "tall")

_NAMES = ("nose", "head", "withers", "tail_base", "tail_tip") + tuple(
    f"{side}_{end}_{part}" for end in ("front", "back") for side in ("left", "right") for part in ("knee", "paw")
)
_LIMBS = [("nose", "head"), ("head", "withers"), ("withers", "tail_base"), ("tail_base", "tail_tip")] + [
    pair
    for side in ("left", "right")
    for end in ("front", "back")
    for pair in (
        ("withers" if end == "front" else "tail_base", f"{side}_{end}_knee"),
        (f"{side}_{end}_knee", f"{side}_{end}_paw"),
    )
]
# One hue per limb around the colour wheel, as OpenPose colours its limbs; OKS falloffs borrowed from
# COCO's closest human keypoints (nose, ear, shoulder, hip, wrist, knee, ankle; Lin et al. 2014).
DOG_SKELETON = Skeleton(
    name="quadruped",
    names=_NAMES,
    limbs=tuple((_NAMES.index(a), _NAMES.index(b)) for a, b in _LIMBS),
    colors=tuple(tuple(round(255 * v) for v in colorsys.hsv_to_rgb(i / len(_LIMBS), 1, 1)) for i in range(len(_LIMBS))),
    sigmas=(0.026, 0.035, 0.079, 0.107, 0.062, 0.087, 0.089, 0.087, 0.089, 0.087, 0.089, 0.087, 0.089),
)
K = {name: i for i, name in enumerate(_NAMES)}

# Per build: withers and tail base (x, y), body thickness and leg thickness, in figure heights.
_BUILD = {
    "normal": dict(withers=(0.24, 0.42), tail=(-0.36, 0.45), body=0.27, leg=0.10),
    "long": dict(withers=(0.33, 0.55), tail=(-0.47, 0.57), body=0.27, leg=0.10),
    "tall": dict(withers=(0.21, 0.38), tail=(-0.31, 0.41), body=0.23, leg=0.09),
}
LEGS = ("stand", "walk", "sit")
HEADS = {
    "up": ((0.17, -0.27), (0.17, -0.05)),
    "level": ((0.20, -0.20), (0.19, 0.05)),
    "down": ((0.24, 0.05), (0.14, 0.14)),
}  # head from withers, nose from head
TAILS = {"up": (-0.17, -0.22), "down": (-0.12, 0.25), "out": (-0.25, -0.04)}
POSES = tuple(
    f"{legs}/head_{head}/tail_{tail}"
    for legs in LEGS
    for head in HEADS
    for tail in TAILS
    if not (legs == "sit" and head == "down")  # a sitting dog sniffing the ground reads as a blob
)
PAW_Y = 0.97
JITTER = 0.012  # figure heights, per keypoint


def dog_pose(pose: str, build: str, rng: np.random.Generator) -> np.ndarray:
    """(13, 2) figure coordinates of ``pose`` ("legs/head_X/tail_Y", one of ``POSES``) for ``build``."""
    if pose not in POSES:
        raise ValueError(f"unknown dog pose {pose!r}; expected one of {POSES}")
    legs, head, tail = pose.split("/")
    b = _BUILD[build]
    kp = np.zeros((len(_NAMES), 2))
    withers, tail_base = np.array(b["withers"]), np.array(b["tail"])
    if legs == "sit":  # hindquarters on the ground, chest up
        withers = withers + (-0.04, -0.04)
        tail_base = np.array([tail_base[0] * 0.55, PAW_Y - b["body"] / 2])
    head_off, nose_off = HEADS[head.removeprefix("head_")]
    kp[K["withers"]], kp[K["tail_base"]] = withers, tail_base
    kp[K["head"]] = withers + head_off
    kp[K["nose"]] = kp[K["head"]] + nose_off
    kp[K["tail_tip"]] = tail_base + TAILS[tail.removeprefix("tail_")]
    stride = {"stand": (0.0, 0.0), "walk": (0.11, -0.09), "sit": (0.0, 0.0)}[legs]
    for side, far, swing in (("left", 0.0, stride[0]), ("right", 0.05, stride[1])):
        top = withers
        paw = np.array([top[0] + far + swing, PAW_Y])
        kp[K[f"{side}_front_paw"]] = paw
        kp[K[f"{side}_front_knee"]] = (top + paw) / 2 + (0.015 + swing * 0.2, 0)
        top = tail_base
        if legs == "sit":  # folded: thigh forward along the ground, paw under the chest
            knee, paw = top + (0.2 + far, -0.02), np.array([top[0] + 0.24 + far, PAW_Y])
        else:
            paw = np.array([top[0] + far - swing, PAW_Y])
            knee = (top + paw) / 2 + (0.04, 0)  # the stifle points forwards
        kp[K[f"{side}_back_knee"]], kp[K[f"{side}_back_paw"]] = knee, paw
    return kp + rng.normal(0, JITTER, kp.shape)


def draw_dog(
    d: ImageDraw.ImageDraw, kp: np.ndarray, colour: str, ears: str, pattern: str, build: str, unit: float
) -> None:
    """Draw the dog whose (13, 2) canvas keypoints are ``kp``; ``unit`` is its height in canvas pixels."""
    b = _BUILD[build]
    p = {name: tuple(kp[i]) for i, name in enumerate(_NAMES)}
    facing = 1 if p["nose"][0] >= p["tail_base"][0] else -1
    near, far = ("left", "right") if facing == 1 else ("right", "left")
    body, leg, outline = b["body"] * unit, b["leg"] * unit, 0.018 * unit
    fill = PALETTE[colour]

    def legs(side: str) -> list[Part]:
        out: list[Part] = []
        for top, end in (("withers", "front"), ("tail_base", "back")):
            knee, paw = p[f"{side}_{end}_knee"], p[f"{side}_{end}_paw"]
            out += [("bar", p[top], knee, leg), ("bar", knee, paw, leg * 0.9)]
            out.append(("ellipse", (paw[0] + facing * 0.02 * unit, paw[1]), 0.055 * unit, 0.03 * unit))
        return out

    silhouette(d, legs(far), shade(fill, 0.72), outline)  # the far legs behind, in shadow
    h, r = p["head"], 0.15 * unit
    parts = legs(near) + [
        ("bar", p["withers"], p["tail_base"], body),
        ("bar", p["withers"], h, 0.17 * unit),  # neck
        ("bar", p["tail_base"], p["tail_tip"], 0.06 * unit),
        ("bar", h, p["nose"], 0.13 * unit),  # muzzle
        ("disc", h, r),
    ]
    if ears == "pointed":  # one upright triangle, leaning back
        ear = ((-0.75, -0.45), (0.1, -0.8), (-0.45, -1.75))
        parts.append(("poly", [(h[0] + x * r * facing, h[1] + y * r) for x, y in ear], 0.06 * r))
    elif ears == "round":
        parts.append(("disc", (h[0] - 0.4 * r * facing, h[1] - 0.9 * r), 0.5 * r))
    elif ears != "floppy":
        raise ValueError(f"unknown dog ears {ears!r}; expected one of {EARS}")
    silhouette(d, parts, fill, outline)
    detail = CONTRAST[colour]
    if ears == "floppy":  # hanging over the side of the head, a shade darker to show against it
        ear: Part = ("ellipse", (h[0] - 0.5 * r * facing, h[1] + 0.05 * r), 0.33 * r, 0.75 * r)
        silhouette(d, [ear], shade(fill, 0.75), outline)
    _pattern(d, np.array(p["withers"]), np.array(p["tail_base"]), body, pattern, detail)
    disc(d, (h[0] + 0.35 * r * facing, h[1] - 0.25 * r), 0.16 * r, detail)  # eye
    disc(d, p["nose"], 0.28 * r, (15, 15, 15))


def _pattern(d: ImageDraw.ImageDraw, front: np.ndarray, back: np.ndarray, body: float, pattern: str, fill) -> None:
    """Spots or stripes on the body's bar, kept inside it (across its thickness, away from its ends)."""
    axis = back - front
    normal = np.array([-axis[1], axis[0]]) / (np.linalg.norm(axis) + 1e-9)
    if normal[1] > 0:
        normal = -normal  # pointing up, so that stripes start from the back
    if pattern == "spots":
        for s, off in ((0.2, 0.12), (0.5, -0.18), (0.78, 0.15), (0.4, 0.25)):
            disc(d, tuple(front + axis * s + normal * off * body), 0.15 * body, fill)
    elif pattern == "stripes":
        for s in (0.28, 0.48, 0.68):
            c = front + axis * s
            bar(d, tuple(c + normal * 0.38 * body), tuple(c - normal * 0.15 * body), 0.14 * body, fill)
    elif pattern != "plain":
        raise ValueError(f"unknown dog pattern {pattern!r}; expected one of {PATTERNS}")
