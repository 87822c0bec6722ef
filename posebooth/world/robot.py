"""The world's humanoid: a robot posed by OpenPose's 18 keypoints and drawn from them, so that every
keypoint sits on the body (nose on the face, neck on the neck, hips inside the pelvis).

Figure coordinates: x to the image's right, 0 on the body's axis; y down, 0 at the top of the head and
1 under the feet; units of the figure's height. Facing the camera, so the subject's right side is on
the image's left (OpenPose's convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from posebooth.poses import KEYPOINT_NAMES
from posebooth.world.drawing import CONTRAST, PALETTE, Part, disc, rotate, silhouette, star

HEADS = ("round", "square", "triangle")
EMBLEMS = ("none", "star", "circle", "stripe")
BUILDS = ("normal", "tall", "stocky")
K = {name: i for i, name in enumerate(KEYPOINT_NAMES)}


@dataclass(frozen=True)
class _Build:
    """Proportions in figure heights: head half-size, half-widths of shoulders and hips, heights of neck,
    shoulders and hips, bone lengths, limb thickness."""

    head: float
    shoulder: float
    hip: float
    neck: float
    shoulder_y: float
    hip_y: float
    upper: float
    fore: float
    thigh: float
    shin: float
    limb: float


_BUILD = {
    "normal": _Build(0.12, 0.12, 0.07, 0.29, 0.32, 0.58, 0.15, 0.14, 0.19, 0.19, 0.08),
    "tall": _Build(0.105, 0.10, 0.06, 0.26, 0.29, 0.53, 0.16, 0.16, 0.215, 0.215, 0.065),
    "stocky": _Build(0.13, 0.155, 0.095, 0.31, 0.34, 0.61, 0.14, 0.13, 0.17, 0.17, 0.10),
}

# Joint angles in degrees away from hanging straight down, positive outwards (90 = horizontal, 180 = up),
# as ((right upper, right lower), (left upper, left lower)). One-sided poses raise the left arm or leg;
# a mirrored placement gives the other side.
ARMS = {
    "down": ((16, 8), (16, 8)),
    "up": ((165, 172), (165, 172)),
    "t": ((90, 90), (90, 90)),
    "v": ((130, 135), (130, 135)),
    "wave": ((16, 8), (100, 168)),
    "one_out": ((16, 8), (90, 90)),
    "one_up": ((16, 8), (168, 174)),
    "hips": ((45, -55), (45, -55)),
}
LEGS = {
    "straight": ((3, 0), (3, 0)),
    "apart": ((16, 10), (16, 10)),
    "step": ((3, 0), (55, -10)),
}
POSES = tuple(f"{arms}/{legs}" for arms in ARMS for legs in LEGS)
JITTER_DEGREES = 5.0  # per joint angle, so that no two renders of a pose share a skeleton


def _direction(degrees: float, side: int) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([side * math.sin(a), math.cos(a)])


def robot_pose(pose: str, build: str, rng: np.random.Generator) -> np.ndarray:
    """(18, 2) figure coordinates of ``pose`` ("arms/legs", one of ``POSES``) for ``build``, each joint
    angle jittered by a few degrees."""
    arms, _, legs = pose.partition("/")
    if arms not in ARMS or legs not in LEGS:
        raise ValueError(f"unknown robot pose {pose!r}; expected one of {POSES}")
    b = _BUILD[build]
    kp = np.zeros((len(KEYPOINT_NAMES), 2))
    r, head_y = b.head, b.neck - 0.045 - b.head  # the head's rim clears the neck keypoint
    kp[K["nose"]] = (0, head_y + 0.1 * r)
    for side, name in ((-1, "right"), (1, "left")):  # on the face; the ears low enough to lie inside a triangle
        kp[K[f"{name}_eye"]] = (side * 0.4 * r, head_y - 0.12 * r)
        kp[K[f"{name}_ear"]] = (side * 0.72 * r, head_y + 0.15 * r)
    kp[K["neck"]] = (0, b.neck)
    for i, (side, name) in enumerate(((-1, "right"), (1, "left"))):
        upper, fore = np.array(ARMS[arms][i]) + rng.normal(0, JITTER_DEGREES, 2)
        shoulder = np.array([side * b.shoulder, b.shoulder_y])
        elbow = shoulder + b.upper * _direction(upper, side)
        kp[K[f"{name}_shoulder"]], kp[K[f"{name}_elbow"]] = shoulder, elbow
        kp[K[f"{name}_wrist"]] = elbow + b.fore * _direction(fore, side)
        thigh, shin = np.array(LEGS[legs][i]) + rng.normal(0, JITTER_DEGREES / 2, 2)
        hip = np.array([side * b.hip, b.hip_y])
        knee = hip + b.thigh * _direction(thigh, side)
        kp[K[f"{name}_hip"]], kp[K[f"{name}_knee"]] = hip, knee
        kp[K[f"{name}_ankle"]] = knee + b.shin * _direction(shin, side)
    return kp


def _head(kp: np.ndarray, shape: str, r: float) -> Part:
    """The head as one polygon part, turned with the neck-to-nose axis (so it tilts with the body)."""
    up = kp[K["nose"]] - kp[K["neck"]]
    centre = kp[K["nose"]] + up * 0.1 * r / np.linalg.norm(up)
    angle = math.degrees(math.atan2(up[0], -up[1]))
    if shape == "round":
        corners = [(r * math.cos(a), r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 20, endpoint=False)]
        pad = 0.0
    elif shape == "square":
        s = 0.82 * r
        corners, pad = [(-s, -s), (s, -s), (s, s), (-s, s)], 0.14 * r
    elif shape == "triangle":  # apex up, wide jaw: reads as a triangle even at a few pixels
        corners, pad = [(0, -1.35 * r), (1.2 * r, 0.85 * r), (-1.2 * r, 0.85 * r)], 0.1 * r
    else:
        raise ValueError(f"unknown robot head {shape!r}; expected one of {HEADS}")
    points = rotate(np.array(corners) + centre, angle, centre)
    return ("poly", [tuple(p) for p in points], pad)


def draw_robot(
    d: ImageDraw.ImageDraw, kp: np.ndarray, colour: str, head: str, emblem: str, build: str, unit: float
) -> None:
    """Draw the robot whose (18, 2) canvas keypoints are ``kp``; ``unit`` is its height in canvas pixels."""
    b = _BUILD[build]
    limb, fill, outline = b.limb * unit, PALETTE[colour], 0.018 * unit
    p = {name: tuple(kp[i]) for i, name in enumerate(KEYPOINT_NAMES)}
    torso = [p["right_shoulder"], p["left_shoulder"], p["left_hip"], p["right_hip"]]
    body: list[Part] = [("poly", torso, 0.05 * unit), ("bar", p["neck"], p["nose"], 0.08 * unit)]
    for side in ("right", "left"):
        body += [
            ("bar", p[f"{side}_hip"], p[f"{side}_knee"], limb),
            ("bar", p[f"{side}_knee"], p[f"{side}_ankle"], limb),
        ]
        ankle = p[f"{side}_ankle"]
        body.append(("ellipse", (ankle[0], ankle[1] + 0.02 * unit), 0.06 * unit, 0.035 * unit))  # feet
    silhouette(d, body, fill, outline)
    detail = CONTRAST[colour]
    _emblem(d, kp, emblem, detail, b, unit)
    for side in ("right", "left"):  # each arm with its own rim, so that arms along the body stay visible
        arm: list[Part] = [
            ("bar", p[f"{side}_shoulder"], p[f"{side}_elbow"], limb),
            ("bar", p[f"{side}_elbow"], p[f"{side}_wrist"], limb),
            ("disc", p[f"{side}_wrist"], 0.75 * limb),
        ]
        silhouette(d, arm, fill, outline)
    silhouette(d, [_head(kp, head, b.head * unit)], fill, outline)  # its own rim: the shape stands out
    for side in ("right", "left"):
        disc(d, p[f"{side}_eye"], 0.032 * unit, detail)


def _emblem(d: ImageDraw.ImageDraw, kp: np.ndarray, emblem: str, fill, b: _Build, unit: float) -> None:
    """The chest emblem, as large as the chest allows so that it survives the downsample."""
    if emblem == "none":
        return
    shoulders = (kp[K["right_shoulder"]] + kp[K["left_shoulder"]]) / 2
    hips = (kp[K["right_hip"]] + kp[K["left_hip"]]) / 2
    c = tuple(shoulders + (hips - shoulders) * 0.38)
    r = (b.shoulder + 0.02) * 0.75 * unit
    if emblem == "star":
        d.polygon(star(c, r), fill=fill)
    elif emblem == "circle":
        disc(d, c, 0.8 * r, fill)
    elif emblem == "stripe":  # a band across the chest, along the shoulder line
        across = kp[K["left_shoulder"]] - kp[K["right_shoulder"]]
        half = across / 2 * 1.15
        down = np.array([-across[1], across[0]]) / np.linalg.norm(across) * 0.045 * unit
        d.polygon(
            [tuple(c - half - down), tuple(c + half - down), tuple(c + half + down), tuple(c - half + down)], fill=fill
        )
    else:
        raise ValueError(f"unknown robot emblem {emblem!r}; expected one of {EMBLEMS}")
