"""Draw the sample subject: the world's held-out robot (posebooth.world.SUBJECT) in its poses and contexts.

Writes ``data/subject/`` (photos with OpenPose-18 sidecar JSONs in stored-pixel coordinates; one photo
is stored rotated with an EXIF orientation tag, as phones do) and ``data/target_poses/`` (poses for
sampling). Deterministic; re-run it only to change the sample data:  python scripts/make_sample_subject.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

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

# The sample subject's photos: renders of the world's held-out instance (posebooth.world.SUBJECT, a tall orange
# robot with a triangle head and a star, which no pretraining scene shows), in its poses and contexts.
# (file name, EXIF orientation): one photo is stored rotated with an orientation tag, as phones do.
PHOTOS = [("robot_01.jpg", 1), ("robot_02.jpg", 1), ("robot_03.png", 1), ("robot_04.jpg", 6), ("robot_05.jpg", 1),
          ("robot_06.png", 1)]  # fmt: skip
PHOTO_SIZE = 128  # pixels; prepare_images resizes to common.resolution
PHOTO_SEED = 7
TARGETS = ("standing", "arms_up", "wave", "t_pose")


def figure_keypoints(pose: str) -> dict[str, tuple[float, float]]:
    """All 18 keypoints of a pose, normalised to the figure box."""
    kp = {**_HEAD, **_SHOULDERS, **_LEGS, **POSES[pose]}
    return {n: kp[n] for n in NAMES}


def to_pixels(kp: dict, box: tuple[int, int, int]) -> np.ndarray:
    """(18, 3) pixel keypoints with confidence 1."""
    left, top, size = box
    return np.array([[left + x * size, top + y * size, 1.0] for x, y in kp.values()])


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
    from posebooth.world import scenes

    for old in [*subject.glob("robot_*.*")]:
        old.unlink()
    renders = scenes.subject_photos(PHOTO_SEED, len(PHOTOS), PHOTO_SIZE)
    for (name, orientation), (scene, img, _) in zip(PHOTOS, renders, strict=True):
        kp = scenes.scene_pose(scene, PHOTO_SIZE).keypoints
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
