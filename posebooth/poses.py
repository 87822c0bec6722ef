"""Keypoint files: reading, validating, transforming (crops, mirror, rescale) and rendering pose maps.

Two formats. OpenPose's 18 body keypoints, optionally with hands and face as OpenPose draws them::

    {"format": "openpose-18", "width": 512, "height": 512,
     "keypoints": [[x, y, confidence], ... 18 rows in KEYPOINT_NAMES order],
     "hands": [[21 rows: left hand], [21 rows: right hand]],      (optional)
     "face": [70 rows]}                                           (optional)

and a custom skeleton, for subjects OpenPose does not know (a quadruped, a robot arm), rendered with
its own limb colours::

    {"format": "custom", "width": 512, "height": 512,
     "skeleton": {"name": "quadruped",
                  "keypoints": ["nose", "withers", "left_front_paw", ...],
                  "limbs": [["nose", "withers"], ["withers", "left_front_paw"], ...],
                  "colors": [[255, 0, 0], [0, 255, 0], ...],    (one RGB per limb)
                  "sigmas": [0.05, ...]},                       (optional: OKS falloff per keypoint)
     "keypoints": {"nose": [x, y, confidence], ...}}          (names not given are absent)

Coordinates are pixels of the image as stored (before EXIF orientation); ``confidence`` is in [0, 1]
and 0 marks a keypoint that is absent (its x, y are then ignored). Names containing ``left``/``right``
swap when a pose is mirrored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = "openpose-18"
CUSTOM = "custom"
HAND_POINTS, FACE_POINTS = 21, 70
KEYPOINT_NAMES = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip


# OKS falloffs of COCO's 17 keypoints (Lin et al. 2014), in OpenPose-18 order; the neck is not a COCO
# keypoint and gets the shoulders' value.
COCO_SIGMAS = (
    np.array(
        [0.26, 0.79, 0.79, 0.72, 0.62, 0.79, 0.72, 0.62, 1.07, 0.87, 0.89, 1.07, 0.87, 0.89, 0.25, 0.25, 0.35, 0.35]
    )
    / 10
)


class PoseError(ValueError):
    """An invalid keypoint file; the message names the file and the problem."""


@dataclass(frozen=True)
class Skeleton:
    """Named keypoints, the limbs between them (index pairs) and a colour per limb."""

    name: str
    names: tuple[str, ...]
    limbs: tuple[tuple[int, int], ...] = ()
    colors: tuple[tuple[int, int, int], ...] = ()
    sigmas: tuple[float, ...] = ()

    @property
    def is_openpose(self) -> bool:
        return self.name == FORMAT

    def mirror_order(self) -> list[int]:
        """For each keypoint, the index of its left/right counterpart (itself when it has none)."""
        swap = {"left": "right", "right": "left"}
        flipped = [re.sub(r"left|right", lambda m: swap[m.group(0)], n) for n in self.names]
        return [self.names.index(f) if f in self.names else i for i, f in enumerate(flipped)]

    def to_json(self) -> dict:
        out = {"name": self.name, "keypoints": list(self.names),
               "limbs": [[self.names[a], self.names[b]] for a, b in self.limbs], "colors": [list(c) for c in self.colors]}  # fmt: skip
        return out | ({"sigmas": list(self.sigmas)} if self.sigmas else {})


OPENPOSE_18 = Skeleton(FORMAT, KEYPOINT_NAMES, sigmas=tuple(COCO_SIGMAS))


@dataclass(frozen=True)
class Pose:
    """Keypoints on a ``width`` x ``height`` canvas; ``keypoints`` is (K, 3): x, y, confidence, in the
    order of ``skeleton.names`` (OpenPose's 18 by default); OpenPose poses may carry ``hands`` (2, 21, 3,
    left then right) and ``face`` (70, 3)."""

    width: int
    height: int
    keypoints: np.ndarray
    skeleton: Skeleton = field(default=OPENPOSE_18)
    hands: np.ndarray | None = None
    face: np.ndarray | None = None

    @property
    def visible(self) -> np.ndarray:
        """Boolean (K,): keypoints present."""
        return self.keypoints[:, 2] > 0

    def to_json(self) -> dict:
        def rows(a):
            return [[round(float(x), 3), round(float(y), 3), round(float(c), 4)] for x, y, c in a]

        head = {"width": self.width, "height": self.height}
        if not self.skeleton.is_openpose:
            kp = {n: r for n, r in zip(self.skeleton.names, rows(self.keypoints), strict=True) if r[2] > 0}
            return {"format": CUSTOM, **head, "skeleton": self.skeleton.to_json(), "keypoints": kp}
        out = {"format": FORMAT, **head, "keypoints": rows(self.keypoints)}
        if self.hands is not None:
            out["hands"] = [rows(h) for h in self.hands]
        if self.face is not None:
            out["face"] = rows(self.face)
        return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _point(row, name: str, w: int, h: int, source: str) -> list[float]:
    """One validated [x, y, confidence] row; absent points (confidence 0) become zeros."""
    if not (isinstance(row, list) and len(row) == 3 and all(_number(v) for v in row)):
        raise PoseError(f"{source}: keypoint {name!r} must be [x, y, confidence], got {row!r}")
    if not all(math.isfinite(v) for v in row):
        raise PoseError(f"{source}: keypoint {name!r} has a NaN or infinite value: {row!r}")
    x, y, c = row
    if not 0 <= c <= 1:
        raise PoseError(f"{source}: keypoint {name!r} confidence {c} is outside [0, 1]")
    if c > 0 and not (0 <= x <= w and 0 <= y <= h):
        raise PoseError(f"{source}: keypoint {name!r} at ({x}, {y}) lies outside the {w} x {h} image")
    return [float(x), float(y), float(c)] if c > 0 else [0.0, 0.0, 0.0]


def _rows(rows, n: int, what: str, w: int, h: int, source: str) -> np.ndarray:
    if not isinstance(rows, list) or len(rows) != n:
        raise PoseError(f"{source}: {what} needs {n} keypoints, got {len(rows) if isinstance(rows, list) else rows!r}")
    return np.asarray([_point(r, f"{what}[{i}]", w, h, source) for i, r in enumerate(rows)], dtype=np.float64)


def parse_skeleton(data, source: str) -> Skeleton:
    """Validate a custom skeleton: unique keypoint names, limbs between known names, a colour per limb."""
    if not isinstance(data, dict):
        raise PoseError(f"{source}: 'skeleton' must be an object with name, keypoints, limbs, colors")
    names = data.get("keypoints")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise PoseError(f"{source}: skeleton.keypoints must be a non-empty list of names")
    if len(set(names)) != len(names):
        raise PoseError(f"{source}: skeleton.keypoints has a repeated name")
    limbs, colors = data.get("limbs", []), data.get("colors", [])
    if not isinstance(limbs, list) or not all(isinstance(lb, list) and len(lb) == 2 for lb in limbs):
        raise PoseError(f"{source}: skeleton.limbs must be a list of [name, name] pairs")
    for a, b in limbs:
        for n in (a, b):
            if n not in names:
                raise PoseError(f"{source}: skeleton limb [{a!r}, {b!r}] names an unknown keypoint {n!r}")
    if not isinstance(colors, list) or len(colors) != len(limbs):
        raise PoseError(f"{source}: skeleton.colors needs one [r, g, b] per limb ({len(limbs)})")
    for c in colors:
        if not (isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)):
            raise PoseError(f"{source}: skeleton colour {c!r} must be three integers in [0, 255]")
    sigmas = data.get("sigmas", [])
    if sigmas and (len(sigmas) != len(names) or not all(_number(v) and v > 0 for v in sigmas)):
        raise PoseError(f"{source}: skeleton.sigmas needs one positive number per keypoint ({len(names)})")
    name = data.get("name", "custom")
    if name == FORMAT:
        raise PoseError(f"{source}: a custom skeleton cannot be called {FORMAT!r}")
    return Skeleton(str(name), tuple(names), tuple((names.index(a), names.index(b)) for a, b in limbs),
                    tuple(tuple(c) for c in colors), tuple(float(v) for v in sigmas))  # fmt: skip


def parse_pose(data, source: str) -> Pose:
    """Validate a decoded keypoint document; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise PoseError(f"{source}: expected a JSON object with format, width, height, keypoints")
    kind = data.get("format")
    if kind not in (FORMAT, CUSTOM):
        raise PoseError(f"{source}: format is {kind!r}; expected {FORMAT!r} or {CUSTOM!r}")
    w, h = data.get("width"), data.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise PoseError(f"{source}: width and height must be positive integers, got {w!r} x {h!r}")
    kp = data.get("keypoints")
    if kind == CUSTOM:
        skeleton = parse_skeleton(data.get("skeleton"), source)
        if not isinstance(kp, dict):
            raise PoseError(f"{source}: keypoints must be an object {{name: [x, y, confidence]}} for a custom skeleton")
        unknown = sorted(set(kp) - set(skeleton.names))
        if unknown:
            raise PoseError(f"{source}: unknown keypoint name(s) {unknown}; the skeleton has {list(skeleton.names)}")
        rows = [_point(kp[n], n, w, h, source) if n in kp else [0.0, 0.0, 0.0] for n in skeleton.names]
        return Pose(w, h, np.asarray(rows, dtype=np.float64), skeleton)
    if not isinstance(kp, list) or len(kp) != len(KEYPOINT_NAMES):
        n = len(kp) if isinstance(kp, list) else kp
        raise PoseError(f"{source}: needs {len(KEYPOINT_NAMES)} keypoints ({', '.join(KEYPOINT_NAMES)}), got {n}")
    body = np.asarray([_point(row, name, w, h, source) for name, row in zip(KEYPOINT_NAMES, kp, strict=True)])
    hands = face = None
    if "hands" in data:
        if not isinstance(data["hands"], list) or len(data["hands"]) != 2:
            raise PoseError(f"{source}: hands must be two lists (left, right) of {HAND_POINTS} keypoints")
        hands = np.stack([_rows(r, HAND_POINTS, f"hands[{i}]", w, h, source) for i, r in enumerate(data["hands"])])
    if "face" in data:
        face = _rows(data["face"], FACE_POINTS, "face", w, h, source)
    unknown = sorted(set(data) - {"format", "width", "height", "keypoints", "hands", "face"})
    if unknown:
        raise PoseError(f"{source}: unknown field(s) {unknown}")
    return Pose(w, h, body.astype(np.float64), OPENPOSE_18, hands, face)


def load_pose(path: Path) -> Pose:
    """Read and validate a keypoint file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PoseError(f"{path}: cannot be read as JSON ({err})") from err
    return parse_pose(data, str(path))


def _map_points(points: np.ndarray, xy_fn, width: int, height: int) -> np.ndarray:
    kp = points.reshape(-1, 3).copy()
    vis = kp[:, 2] > 0
    if vis.any():
        kp[vis, :2] = xy_fn(kp[vis, :2])
    inside = (kp[:, 0] >= 0) & (kp[:, 0] <= width) & (kp[:, 1] >= 0) & (kp[:, 1] <= height)
    kp[~(vis & inside)] = 0.0
    return kp.reshape(points.shape)


def map_pose(pose: Pose, xy_fn, width: int, height: int) -> Pose:
    """Apply a coordinate map to the visible keypoints (hands and face too); points leaving the new canvas
    become absent."""
    return replace(
        pose, width=width, height=height, keypoints=_map_points(pose.keypoints, xy_fn, width, height),
        hands=None if pose.hands is None else _map_points(pose.hands, xy_fn, width, height),
        face=None if pose.face is None else _map_points(pose.face, xy_fn, width, height),
    )  # fmt: skip


def mirror_pose(pose: Pose) -> Pose:
    """The pose mirrored left to right: x -> width - x, and left and right keypoints (and hands) swapped."""
    mirrored = map_pose(pose, lambda xy: np.stack([pose.width - xy[:, 0], xy[:, 1]], axis=1), pose.width, pose.height)
    hands = None if mirrored.hands is None else mirrored.hands[::-1].copy()
    face = mirrored.face  # OpenPose's 70 face points are not left/right symmetric by index: kept in place
    return replace(mirrored, keypoints=mirrored.keypoints[pose.skeleton.mirror_order()], hands=hands, face=face)


def scale_pose(pose: Pose, factor: float) -> Pose:
    """The pose scaled by ``factor`` about the centre of its body keypoints' bounding box (points leaving
    the canvas become absent)."""
    if not factor > 0:
        raise PoseError(f"pose scale factor must be > 0, got {factor}")
    vis = pose.visible
    if not vis.any():
        return pose
    xy = pose.keypoints[vis, :2]
    centre = (xy.min(0) + xy.max(0)) / 2
    return map_pose(pose, lambda p: (p - centre) * factor + centre, pose.width, pose.height)


def crop_scale_pose(pose: Pose, box: tuple[int, int, int, int], size: int | tuple[int, int]) -> Pose:
    """Follow a crop to ``box`` (left, top, right, bottom) and a resize to ``size`` (an int: a square; or
    (width, height), e.g. an aspect-ratio bucket)."""
    width, height = (size, size) if isinstance(size, int) else size
    left, top, right, bottom = box
    sx, sy = width / (right - left), height / (bottom - top)
    return map_pose(pose, lambda xy: (xy - [left, top]) * [sx, sy], width, height)


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

    def points(rows):
        return [
            keypoint_cls(x / render_size, y / render_size, c, i) if c > 0 else None for i, (x, y, c) in enumerate(rows)
        ]

    canvas = np.zeros((render_size, render_size, 3), dtype=np.uint8)  # black, not grey
    if pose.skeleton.is_openpose:
        canvas = draw_bodypose(canvas, points(square.keypoints))
        for hand in square.hands if square.hands is not None else []:
            _draw_hand(canvas, hand)
        if square.face is not None:
            for x, y, c in square.face:  # OpenPose's face: white dots
                if c > 0:
                    cv2.circle(canvas, (int(x), int(y)), 3, (255, 255, 255), thickness=-1)
    else:
        canvas = _draw_skeleton(canvas, square)
    return Image.fromarray(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA))


HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]  # fmt: skip


def _draw_hand(canvas: np.ndarray, hand: np.ndarray) -> None:
    """OpenPose's hand drawing (as controlnet_aux's ``draw_handpose``, which needs matplotlib and fails on
    missing points): each edge in its own hue, 2 px; each point a blue dot."""
    import colorsys

    import cv2

    for i, (a, b) in enumerate(HAND_EDGES):
        if hand[a, 2] > 0 and hand[b, 2] > 0:
            rgb = [int(v * 255) for v in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)]
            cv2.line(canvas, (int(hand[a, 0]), int(hand[a, 1])), (int(hand[b, 0]), int(hand[b, 1])), rgb, thickness=2)
    for x, y, c in hand:
        if c > 0:
            cv2.circle(canvas, (int(x), int(y)), 4, (0, 0, 255), thickness=-1)


def _draw_skeleton(canvas: np.ndarray, pose: Pose) -> np.ndarray:
    """A custom skeleton drawn the way OpenPose draws bodies: each limb an ellipse 4 px wide (at 512 px) in
    its colour at 60 %, each keypoint a dot in the colour of its first limb (white when it has none)."""
    import cv2

    kp, sk = pose.keypoints, pose.skeleton
    for (a, b), color in zip(sk.limbs, sk.colors, strict=True):
        if kp[a, 2] <= 0 or kp[b, 2] <= 0:
            continue
        (x1, y1), (x2, y2) = kp[a, :2], kp[b, :2]
        length = math.hypot(x1 - x2, y1 - y2)
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        polygon = cv2.ellipse2Poly(
            (int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), 4), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for i, (x, y, c) in enumerate(kp):
        if c > 0:
            color = next((sk.colors[j] for j, limb in enumerate(sk.limbs) if i in limb), (255, 255, 255))
            cv2.circle(canvas, (int(x), int(y)), 4, [int(v) for v in color], thickness=-1)
    return canvas


def _controlnet_aux_drawing():
    """Import controlnet_aux's drawing code, hiding the warnings its package import prints."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose.body import Keypoint
        from controlnet_aux.open_pose.util import draw_bodypose
    return draw_bodypose, Keypoint


def render_pose_size(pose: Pose, width: int, height: int, render_size: int = 512) -> Image.Image:
    """``render_pose`` on a ``width`` x ``height`` canvas: the pose letterboxed into it (scaled to fit and
    centred), drawn on the enclosing square and cropped, so the sticks keep the square drawing's width."""
    if width == height:
        return render_pose(pose, width, render_size)
    side = max(width, height)
    scale = min(width / pose.width, height / pose.height)
    offset = [(side - pose.width * scale) / 2, (side - pose.height * scale) / 2]
    square = map_pose(pose, lambda xy: xy * scale + offset, side, side)
    left, top = (side - width) // 2, (side - height) // 2
    return render_pose(square, side, render_size).crop((left, top, left + width, top + height))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_pose_entry(entry: str) -> tuple[Path, bool, float]:
    """``path[#mirror][,scale=F]`` -> (path, mirror, scale). For example ``wave.json#mirror,scale=0.8``."""
    path, _, mods = entry.partition("#")
    mirror, scale = False, 1.0
    for mod in filter(None, (m.strip() for m in mods.split(","))):
        if mod == "mirror":
            mirror = True
        elif mod.startswith("scale="):
            try:
                scale = float(mod.removeprefix("scale="))
            except ValueError:
                scale = -1.0
            if not scale > 0:
                raise PoseError(f"sample.poses: {entry!r}: scale must be a positive number, e.g. #scale=0.8")
        else:
            raise PoseError(f"sample.poses: {entry!r}: unknown modifier {mod!r}; use #mirror and/or #scale=F")
    return Path(path), mirror, scale


def entry_name(path: Path, mirror: bool, scale: float) -> str:
    return path.stem + ("_mirror" if mirror else "") + (f"_x{scale:g}" if scale != 1.0 else "")


def load_target_poses(entries: list[str], folder: str | Path, detect=None) -> dict[str, Pose]:
    """Validate ``sample.poses``: keypoint files or reference images inside ``folder`` (the stage's declared
    dependency), each optionally ``#mirror`` and/or ``#scale=F``; returns ``{name: Pose}`` in order.

    A reference image goes through ``detect`` (image -> Pose or None), the extract_poses detector.
    """
    folder = Path(folder).resolve()
    poses: dict[str, Pose] = {}
    for entry in entries:
        path, mirror, scale = parse_pose_entry(entry)
        if folder not in path.resolve().parents:
            raise PoseError(
                f"sample.poses: {path} must lie in {folder.name}/ (the folder dvc.yaml tracks); move it there"
            )
        name = entry_name(path, mirror, scale)
        if name in poses:
            raise PoseError(f"sample.poses: two poses are named {name!r}; give the files distinct names")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            pose = pose_from_image(path, detect)
        else:
            pose = load_pose(path)
        if mirror:
            pose = mirror_pose(pose)
        poses[name] = scale_pose(pose, scale) if scale != 1.0 else pose
    return poses


def pose_from_image(path: Path, detect, key: str = "sample.poses") -> Pose:
    """The pose ``detect`` (PIL image -> Pose or None) reads in the photo at ``path``; ``detect`` None (the
    sidecar detector) and unreadable or pose-less photos raise PoseError naming ``key`` and the file."""
    if detect is None:
        raise PoseError(
            f"{key}: {path} is an image; reading its pose needs extract_poses.detector openpose, dwpose or world "
            "(the sidecar detector only has your annotations): switch the detector or write its keypoints"
        )
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except OSError as err:
        raise PoseError(f"{key}: {path}: cannot be read as an image ({err})") from err
    pose = detect(image)
    if pose is None:
        raise PoseError(f"{key}: {path}: the detector found no pose in it; use another reference image")
    return pose
