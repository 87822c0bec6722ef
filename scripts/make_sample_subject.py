"""Draw the embedded sample subject: a stylised robot in different poses and backgrounds.

Writes ``data/subject/`` (photos with OpenPose-18 sidecar JSONs in stored-pixel coordinates; one photo
is stored rotated with an EXIF orientation tag, as phones do) and ``data/target_poses/`` (poses for
sampling). Deterministic; re-run it only to change the sample data:  python scripts/make_sample_subject.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posebooth.images import EXIF_ORIENTATION, orient_points  # noqa: E402
from posebooth.poses import Pose, parse_pose  # noqa: E402

SS = 4  # supersampling factor for anti-aliased drawing

# Poses in normalised figure coordinates (x right, y down); image-left is the subject's right side.
_HEAD = {
    "nose": (0.50, 0.20),
    "neck": (0.50, 0.30),
    "right_eye": (0.47, 0.18),
    "left_eye": (0.53, 0.18),
    "right_ear": (0.43, 0.19),
    "left_ear": (0.57, 0.19),
}
_LEGS = {
    "right_hip": (0.45, 0.58),
    "right_knee": (0.45, 0.73),
    "right_ankle": (0.45, 0.88),
    "left_hip": (0.55, 0.58),
    "left_knee": (0.55, 0.73),
    "left_ankle": (0.55, 0.88),
}
_SHOULDERS = {"right_shoulder": (0.40, 0.31), "left_shoulder": (0.60, 0.31)}
POSES = {
    "standing": {
        "right_elbow": (0.37, 0.45),
        "right_wrist": (0.36, 0.58),
        "left_elbow": (0.63, 0.45),
        "left_wrist": (0.64, 0.58),
    },
    "arms_up": {
        "right_elbow": (0.35, 0.20),
        "right_wrist": (0.33, 0.08),
        "left_elbow": (0.65, 0.20),
        "left_wrist": (0.67, 0.08),
    },
    "wave": {
        "right_elbow": (0.37, 0.45),
        "right_wrist": (0.36, 0.58),
        "left_elbow": (0.72, 0.25),
        "left_wrist": (0.70, 0.10),
    },
    "t_pose": {
        "right_elbow": (0.27, 0.31),
        "right_wrist": (0.15, 0.31),
        "left_elbow": (0.73, 0.31),
        "left_wrist": (0.85, 0.31),
    },
    "walking": {
        "right_elbow": (0.42, 0.45),
        "right_wrist": (0.46, 0.56),
        "left_elbow": (0.60, 0.45),
        "left_wrist": (0.56, 0.57),
        "right_knee": (0.40, 0.73),
        "right_ankle": (0.36, 0.88),
        "left_knee": (0.58, 0.73),
        "left_ankle": (0.62, 0.88),
    },
    "hands_on_hips": {
        "right_elbow": (0.30, 0.42),
        "right_wrist": (0.43, 0.56),
        "left_elbow": (0.70, 0.42),
        "left_wrist": (0.57, 0.56),
    },
}
NAMES = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)

# (file name, pose, (width, height), figure box (left, top, size) in pixels, background colours, EXIF orientation)
PHOTOS = [
    ("robot_01.jpg", "standing", (120, 160), (10, 30, 100), ((90, 140, 200), (200, 220, 240)), 1),
    ("robot_02.jpg", "arms_up", (160, 120), (30, 8, 104), ((60, 120, 60), (150, 200, 120)), 1),
    ("robot_03.png", "wave", (128, 128), (12, 10, 108), ((180, 170, 150), (240, 230, 210)), 1),
    ("robot_04.jpg", "t_pose", (150, 120), (18, 6, 110), ((40, 40, 70), (110, 100, 150)), 6),
    ("robot_05.jpg", "walking", (120, 150), (8, 20, 104), ((200, 160, 120), (250, 220, 180)), 1),
    ("robot_06.png", "hands_on_hips", (140, 140), (14, 12, 112), ((120, 60, 60), (220, 150, 140)), 1),
]
TARGETS = ("standing", "arms_up", "wave", "t_pose")


def figure_keypoints(pose: str) -> dict[str, tuple[float, float]]:
    """All 18 keypoints of a pose, normalised to the figure box."""
    kp = {**_HEAD, **_SHOULDERS, **_LEGS, **POSES[pose]}
    return {n: kp[n] for n in NAMES}


def to_pixels(kp: dict, box: tuple[int, int, int]) -> np.ndarray:
    """(18, 3) pixel keypoints with confidence 1."""
    left, top, size = box
    return np.array([[left + x * size, top + y * size, 1.0] for x, y in kp.values()])


def draw_robot(canvas: Image.Image, kp: np.ndarray, size: int) -> None:
    """Draw the robot (silver head, cyan eyes, orange torso, dark limbs) on ``canvas`` (supersampled)."""
    d = ImageDraw.Draw(canvas)
    p = {n: (x * SS, y * SS) for n, (x, y, _) in zip(NAMES, kp, strict=False)}
    u = size * SS / 100  # one hundredth of the figure
    limb = max(2, int(4.5 * u))
    for a, b in [
        ("right_hip", "right_knee"),
        ("right_knee", "right_ankle"),
        ("left_hip", "left_knee"),
        ("left_knee", "left_ankle"),
        ("right_shoulder", "right_elbow"),
        ("right_elbow", "right_wrist"),
        ("left_shoulder", "left_elbow"),
        ("left_elbow", "left_wrist"),
    ]:
        d.line([p[a], p[b]], fill=(55, 55, 65), width=limb)
    for n in ("right_elbow", "left_elbow", "right_knee", "left_knee"):
        x, y = p[n]
        d.ellipse([x - 3 * u, y - 3 * u, x + 3 * u, y + 3 * u], fill=(230, 190, 40))
    for n in ("right_wrist", "left_wrist"):
        x, y = p[n]
        d.ellipse([x - 3.5 * u, y - 3.5 * u, x + 3.5 * u, y + 3.5 * u], fill=(90, 90, 100))
    for n in ("right_ankle", "left_ankle"):
        x, y = p[n]
        d.rectangle([x - 5 * u, y - 2 * u, x + 5 * u, y + 3 * u], fill=(40, 40, 45))
    (rsx, rsy), (lsx, _), (_, hy) = p["right_shoulder"], p["left_shoulder"], p["right_hip"]
    d.rounded_rectangle([rsx - 2 * u, rsy - 2 * u, lsx + 2 * u, hy + 2 * u], radius=3 * u, fill=(235, 110, 30))
    cx, cy = (rsx + lsx) / 2, (rsy + hy) / 2
    d.rectangle([cx - 5 * u, cy - 6 * u, cx + 5 * u, cy + 2 * u], fill=(250, 230, 200))
    d.ellipse([cx - 2 * u, cy - 4 * u, cx + 2 * u, cy], fill=(220, 30, 30))
    nx, ny = p["nose"]
    d.line([(nx, ny - 8 * u), (nx, ny - 14 * u)], fill=(120, 120, 130), width=max(1, int(u)))
    d.ellipse([nx - 2 * u, ny - 16 * u, nx + 2 * u, ny - 12 * u], fill=(220, 30, 30))
    d.rounded_rectangle([nx - 8 * u, ny - 8 * u, nx + 8 * u, ny + 8 * u], radius=3 * u, fill=(190, 195, 205))
    for n in ("right_ear", "left_ear"):
        x, y = p[n]
        d.ellipse([x - 2 * u, y - 2 * u, x + 2 * u, y + 2 * u], fill=(120, 120, 130))
    for n in ("right_eye", "left_eye"):
        x, y = p[n]
        d.ellipse([x - 1.8 * u, y - 1.8 * u, x + 1.8 * u, y + 1.8 * u], fill=(20, 220, 240))
    d.line([(nx - 4 * u, ny + 4 * u), (nx + 4 * u, ny + 4 * u)], fill=(60, 60, 70), width=max(1, int(u)))


def background(size: tuple[int, int], top: tuple, bottom: tuple, seed: int) -> Image.Image:
    """A vertical gradient with a floor band and a little seeded texture."""
    w, h = size[0] * SS, size[1] * SS
    t = np.linspace(0, 1, h)[:, None, None]
    img = (1 - t) * np.array(top) + t * np.array(bottom)
    img = np.broadcast_to(img, (h, w, 3)).copy()
    img[int(h * 0.78) :] *= 0.8  # floor
    img += np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_photo(pose: str, size: tuple[int, int], box: tuple[int, int, int], colours, seed: int):
    """One displayed (upright) photo and its (18, 3) keypoints."""
    kp = to_pixels(figure_keypoints(pose), box)
    canvas = background(size, *colours, seed)
    draw_robot(canvas, kp, box[2])
    img = canvas.resize(size, Image.Resampling.LANCZOS).filter(ImageFilter.SMOOTH)
    return img, kp


def store_rotated(img: Image.Image, kp: np.ndarray, orientation: int):
    """Pixels and keypoints as a camera would store them for ``orientation`` (only 1 and 6 needed here)."""
    if orientation == 1:
        return img, kp
    assert orientation == 6, orientation
    stored = img.transpose(Image.Transpose.ROTATE_90)  # displayed = stored rotated 90 clockwise
    w_s, h_s = stored.size
    xy = np.stack([kp[:, 1], h_s - kp[:, 0]], axis=1)  # inverse of orient_points for 6
    assert np.allclose(orient_points(xy, 6, (w_s, h_s)), kp[:, :2])
    return stored, np.concatenate([xy, kp[:, 2:]], axis=1)


def write_pose(path: Path, kp: np.ndarray, w: int, h: int) -> None:
    doc = Pose(w, h, kp).to_json()
    parse_pose(doc, str(path))  # what we write must validate
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    subject, targets = ROOT / "data" / "subject", ROOT / "data" / "target_poses"
    subject.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    for i, (name, pose, size, box, colours, orientation) in enumerate(PHOTOS):
        img, kp = make_photo(pose, size, box, colours, seed=i)
        stored, kp = store_rotated(img, kp, orientation)
        path = subject / name
        if path.suffix == ".jpg":
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = orientation
            stored.save(path, quality=92, exif=exif)
        else:
            stored.save(path)
        write_pose(path.with_suffix(".json"), kp, *stored.size)
    for pose in TARGETS:
        write_pose(targets / f"{pose}.json", to_pixels(figure_keypoints(pose), (0, 0, 512)), 512, 512)
    print(f"wrote {len(PHOTOS)} photos to {subject} and {len(TARGETS)} target poses to {targets}")


if __name__ == "__main__":
    main()
