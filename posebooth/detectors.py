"""Pose detectors behind one interface, chosen by ``extract_poses.detector``.

- ``sidecar``: hand-annotated keypoints (the JSON next to each photo, mapped by ``prepare_images``);
  it finds nothing on images without annotations (class images, generated samples).
- ``openpose``: controlnet_aux's OpenPose body model; weights ``body_pose_model.pth`` from a hub id
  (``lllyasviel/Annotators``) or a local folder. controlnet_aux reads them with ``torch.load``, which in
  this torch version defaults to ``weights_only=True`` (no unpickling of code).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from posebooth import hub
from posebooth.poses import KEYPOINT_NAMES, Pose, PoseError, load_pose

OPENPOSE_BODY_FILE = "body_pose_model.pth"


class Detector(Protocol):
    """Finds the pose in an image; ``None`` when it finds none."""

    name: str

    def detect(self, image: Image.Image, keypoints_path: Path | None = None) -> Pose | None: ...


class SidecarDetector:
    """Hand-annotated keypoints: the sidecar JSON that ``prepare_images`` mapped into the prepared image."""

    name = "sidecar"

    def detect(self, image: Image.Image, keypoints_path: Path | None = None) -> Pose | None:
        if keypoints_path is None or not keypoints_path.exists():
            return None
        pose = load_pose(keypoints_path)
        if (pose.width, pose.height) != image.size:
            raise PoseError(f"{keypoints_path}: canvas {pose.width}x{pose.height} != image {image.size}")
        return pose


def pose_from_bodies(bodies, width: int, height: int) -> Pose | None:
    """The highest-scoring person of controlnet_aux ``BodyResult``s (pixel keypoints) as a ``Pose``."""
    if not bodies:
        return None
    best = max(bodies, key=lambda b: (b.total_score, b.total_parts))
    kp = np.zeros((len(KEYPOINT_NAMES), 3))
    for i, k in enumerate(best.keypoints[: len(KEYPOINT_NAMES)]):
        if k is not None:
            kp[i] = [min(max(k.x, 0.0), width), min(max(k.y, 0.0), height), min(max(float(k.score), 1e-3), 1.0)]
    return Pose(width, height, kp) if (kp[:, 2] > 0).any() else None


class OpenposeDetector:
    """controlnet_aux's OpenPose body estimator (18 keypoints with confidences)."""

    name = "openpose"

    def __init__(self, weights: str, estimator=None):
        """``weights``: a hub id or folder holding ``body_pose_model.pth``; ``estimator`` replaces the model (tests)."""
        if estimator is None:
            estimator = load_openpose_body(weights)
        self.estimator = estimator

    def detect(self, image: Image.Image, keypoints_path: Path | None = None) -> Pose | None:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()  # controlnet_aux expects OpenCV's BGR
        candidate, subset = self.estimator(bgr)
        return pose_from_bodies(self.estimator.format_body_result(candidate, subset), *image.size)


def load_openpose_body(weights: str):
    """controlnet_aux's ``Body`` from a local folder or a hub id; fails at once when it cannot be had."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose.body import Body
    what = f"OpenPose weights ({OPENPOSE_BODY_FILE})"
    hub.require(weights, OPENPOSE_BODY_FILE, what)
    if Path(weights).is_dir():
        path = Path(weights) / OPENPOSE_BODY_FILE
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(weights, OPENPOSE_BODY_FILE)
        except OSError as err:
            raise OSError(
                f"{what} from {weights!r} could not be downloaded ({err}): {hub.how_to_get(weights)}"
            ) from err
    return Body(str(path))


def make_detector(name: str, openpose_weights: str = "lllyasviel/Annotators") -> Detector:
    """The detector called ``name`` in params (``extract_poses.detector``)."""
    if name == "sidecar":
        return SidecarDetector()
    if name == "openpose":
        return OpenposeDetector(openpose_weights)
    raise ValueError(f"extract_poses.detector: unknown detector {name!r}; available: ['sidecar', 'openpose']")
