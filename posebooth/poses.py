"""Keypoints in the OpenPose 18-body-keypoint format: reading, validating, transforming, rendering.

A keypoint file (``*.json``) is also how users annotate subjects that no detector handles::

    {"format": "openpose-18", "width": 512, "height": 512,
     "keypoints": [[x, y, confidence], ... 18 rows in KEYPOINT_NAMES order]}

Coordinates are pixels of the image as stored (before EXIF orientation); ``confidence`` is in [0, 1]
and 0 marks a keypoint that is absent (its x, y are then ignored).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = "openpose-18"
KEYPOINT_NAMES = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip


class PoseError(ValueError):
    """An invalid keypoint file; the message names the file and the problem."""


@dataclass(frozen=True)
class Pose:
    """18 body keypoints on a ``width`` x ``height`` canvas; ``keypoints`` is (18, 3): x, y, confidence."""

    width: int
    height: int
    keypoints: np.ndarray

    @property
    def visible(self) -> np.ndarray:
        """Boolean (18,): keypoints present."""
        return self.keypoints[:, 2] > 0

    def to_json(self) -> dict:
        kp = [[round(float(x), 3), round(float(y), 3), round(float(c), 4)] for x, y, c in self.keypoints]
        return {"format": FORMAT, "width": self.width, "height": self.height, "keypoints": kp}


def parse_pose(data, source: str) -> Pose:
    """Validate a decoded keypoint document; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise PoseError(f"{source}: expected a JSON object with format, width, height, keypoints")
    if data.get("format") != FORMAT:
        raise PoseError(f"{source}: format is {data.get('format')!r}; expected {FORMAT!r}")
    w, h = data.get("width"), data.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise PoseError(f"{source}: width and height must be positive integers, got {w!r} x {h!r}")
    kp = data.get("keypoints")
    if not isinstance(kp, list) or len(kp) != len(KEYPOINT_NAMES):
        n = len(kp) if isinstance(kp, list) else kp
        raise PoseError(f"{source}: needs {len(KEYPOINT_NAMES)} keypoints ({', '.join(KEYPOINT_NAMES)}), got {n}")
    rows = []
    for name, row in zip(KEYPOINT_NAMES, kp, strict=False):
        ok = isinstance(row, list) and len(row) == 3
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        if not ok:
            raise PoseError(f"{source}: keypoint {name!r} must be [x, y, confidence], got {row!r}")
        if not all(math.isfinite(v) for v in row):
            raise PoseError(f"{source}: keypoint {name!r} has a NaN or infinite value: {row!r}")
        x, y, c = row
        if not 0 <= c <= 1:
            raise PoseError(f"{source}: keypoint {name!r} confidence {c} is outside [0, 1]")
        if c > 0 and not (0 <= x <= w and 0 <= y <= h):
            raise PoseError(f"{source}: keypoint {name!r} at ({x}, {y}) lies outside the {w} x {h} image")
        rows.append(row if c > 0 else [0.0, 0.0, 0.0])
    return Pose(w, h, np.asarray(rows, dtype=np.float64))


def load_pose(path: Path) -> Pose:
    """Read and validate a keypoint file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PoseError(f"{path}: cannot be read as JSON ({err})") from err
    return parse_pose(data, str(path))


def map_pose(pose: Pose, xy_fn, width: int, height: int) -> Pose:
    """Apply a coordinate map to the visible keypoints; points leaving the new canvas become absent."""
    kp = pose.keypoints.copy()
    vis = pose.visible
    if vis.any():
        kp[vis, :2] = xy_fn(kp[vis, :2])
    inside = (kp[:, 0] >= 0) & (kp[:, 0] <= width) & (kp[:, 1] >= 0) & (kp[:, 1] <= height)
    kp[~(vis & inside)] = 0.0
    return Pose(width, height, kp)


def crop_scale_pose(pose: Pose, box: tuple[int, int, int, int], size: int) -> Pose:
    """Follow a crop to ``box`` (left, top, right, bottom) and a resize to ``size`` x ``size``."""
    left, top, right, bottom = box
    sx, sy = size / (right - left), size / (bottom - top)
    return map_pose(pose, lambda xy: (xy - [left, top]) * [sx, sy], size, size)


def fit_square(pose: Pose, size: int) -> Pose:
    """The pose on a ``size`` x ``size`` canvas, letterboxed: scaled by its longer side and centred, so a
    non-square pose keeps its proportions (as ``prepare_images``' padding does for photos)."""
    scale = size / max(pose.width, pose.height)
    offset = [(size - pose.width * scale) / 2, (size - pose.height * scale) / 2]
    return map_pose(pose, lambda xy: xy * scale + offset, size, size)


def render_pose(pose: Pose, size: int, render_size: int = 512) -> Image.Image:
    """OpenPose-style skeleton on a black background, ``size`` x ``size`` RGB (non-square poses letterboxed).

    Drawn with controlnet_aux's ``draw_bodypose`` (normalised coordinates, fixed stick width) at
    ``render_size`` so limbs keep OpenPose's proportions, then resized with area averaging.
    """
    import cv2

    draw_bodypose, keypoint_cls = _controlnet_aux_drawing()
    square = fit_square(pose, render_size)
    points = [
        keypoint_cls(x / render_size, y / render_size, c, i) if c > 0 else None
        for i, (x, y, c) in enumerate(square.keypoints)
    ]
    canvas = np.zeros((render_size, render_size, 3), dtype=np.uint8)  # black, not grey
    canvas = draw_bodypose(canvas, points)
    return Image.fromarray(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA))


def _controlnet_aux_drawing():
    """Import controlnet_aux's drawing code, hiding the warnings its package import prints."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose.body import Keypoint
        from controlnet_aux.open_pose.util import draw_bodypose
    return draw_bodypose, Keypoint


def load_target_poses(paths: list[str], folder: str | Path) -> dict[str, Pose]:
    """Validate ``sample.poses``: files inside ``folder`` (the stage's declared dependency) with distinct
    names; returns ``{name: Pose}`` in the given order."""
    folder = Path(folder).resolve()
    poses: dict[str, Pose] = {}
    for p in paths:
        path = Path(p)
        if folder not in path.resolve().parents:
            raise PoseError(f"sample.poses: {p} must lie in {folder.name}/ (the folder dvc.yaml tracks); move it there")
        if path.stem in poses:
            raise PoseError(f"sample.poses: two poses are named {path.stem!r}; give the files distinct names")
        poses[path.stem] = load_pose(path)
    return poses
