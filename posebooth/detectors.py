"""Pose detectors behind one interface, chosen by ``extract_poses.detector``.

- ``sidecar``: hand-annotated keypoints (the JSON next to each photo, mapped by ``prepare_images``);
  it finds nothing on images without annotations (class images, generated samples).
- ``openpose``: controlnet_aux's OpenPose body model, optionally its hand and face models; weights
  ``body_pose_model.pth`` (``hand_pose_model.pth``, ``facenet.pth``) from a hub id
  (``lllyasviel/Annotators``) or a local folder. controlnet_aux reads them with ``torch.load``, which in
  this torch version defaults to ``weights_only=True`` (no unpickling of code).
- ``dwpose``: DWPose (RTMW-DW whole-body, with a YOLOX person detector) through rtmlib on onnxruntime,
  no mmcv; its ONNX weights come from OpenMMLab's download server (or local ``.onnx`` files).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from posebooth import hub
from posebooth.poses import FACE_POINTS, HAND_POINTS, KEYPOINT_NAMES, Pose, PoseError, load_pose

OPENPOSE_BODY_FILE = "body_pose_model.pth"
OPENPOSE_HAND_FILE = "hand_pose_model.pth"
OPENPOSE_FACE_FILE = "facenet.pth"
DETECTORS = ("sidecar", "openpose", "dwpose", "world")


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
    """controlnet_aux's OpenPose body estimator (18 keypoints with confidences), with its hand and face
    estimators when asked for."""

    name = "openpose"

    def __init__(
        self, weights: str, estimator=None, hands: bool = False, face: bool = False, hand=None, face_model=None
    ):
        """``weights``: a hub id or folder holding the ``.pth`` files; ``estimator``, ``hand`` and
        ``face_model`` replace the models (tests)."""
        self.estimator = estimator if estimator is not None else load_openpose(weights, OPENPOSE_BODY_FILE, "Body")
        self.hand = hand if hand is not None or not hands else load_openpose(weights, OPENPOSE_HAND_FILE, "Hand")
        self.face = (
            face_model if face_model is not None or not face else load_openpose(weights, OPENPOSE_FACE_FILE, "Face")
        )

    def detect(self, image: Image.Image, keypoints_path: Path | None = None) -> Pose | None:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()  # controlnet_aux expects OpenCV's BGR
        candidate, subset = self.estimator(bgr)
        bodies = self.estimator.format_body_result(candidate, subset)
        pose = pose_from_bodies(bodies, *image.size)
        if pose is None or (self.hand is None and self.face is None):
            return pose
        best = max(bodies, key=lambda b: (b.total_score, b.total_parts))
        return Pose(pose.width, pose.height, pose.keypoints, hands=self._hands(best, bgr), face=self._face(best, bgr))

    def _hands(self, body, bgr) -> np.ndarray | None:
        if self.hand is None:
            return None
        from controlnet_aux.open_pose.util import handDetect

        hands = np.zeros((2, HAND_POINTS, 3))
        for x, y, w, is_left in handDetect(body, bgr):
            peaks = self.hand(bgr[y : y + w, x : x + w, :]).astype(np.float64)  # (21, 2), 0 where not found
            found = (peaks[:, 0] > 1e-6) | (peaks[:, 1] > 1e-6)
            hands[0 if is_left else 1][found] = np.column_stack([peaks[found] + [x, y], np.ones(found.sum())])
        return hands

    def _face(self, body, bgr) -> np.ndarray | None:
        if self.face is None:
            return None
        from controlnet_aux.open_pose.util import faceDetect

        box = faceDetect(body, bgr)
        if box is None:
            return None
        x, y, w = box
        heatmaps = self.face(bgr[y : y + w, x : x + w, :])
        peaks = self.face.compute_peaks_from_heatmaps(heatmaps).astype(np.float64)  # (70, 2)
        found = (peaks[:, 0] > 1e-6) | (peaks[:, 1] > 1e-6)
        face = np.zeros((FACE_POINTS, 3))
        face[found] = np.column_stack([peaks[found] + [x, y], np.ones(found.sum())])
        return face


def load_openpose(weights: str, filename: str, model: str):
    """controlnet_aux's ``Body``, ``Hand`` or ``Face`` from a local folder or a hub id; fails at once when
    the weights cannot be had."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose import body, face, hand

    cls = {"Body": body.Body, "Hand": hand.Hand, "Face": face.Face}[model]
    what = f"OpenPose {model.lower()} weights ({filename})"
    hub.require(weights, filename, what)
    if Path(weights).is_dir():
        path = Path(weights) / filename
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(weights, filename)
        except OSError as err:
            raise OSError(
                f"{what} from {weights!r} could not be downloaded ({err}): {hub.how_to_get(weights)}"
            ) from err
    return cls(str(path))


def load_openpose_body(weights: str):
    """controlnet_aux's OpenPose ``Body`` model."""
    return load_openpose(weights, OPENPOSE_BODY_FILE, "Body")


def pose_from_wholebody(keypoints, scores, width: int, height: int, hands: bool, face: bool,
                        threshold: float = 0.3) -> Pose | None:  # fmt: skip
    """The best person of rtmlib's whole-body output in OpenPose order (``to_openpose=True``: (N, 134, 2)
    keypoints and (N, 134) scores: 18 body, 6 feet, 68 face, 21 left hand, 21 right hand) as a ``Pose``.
    Points scoring under ``threshold`` (DWPose's 0.3) are absent; confidences are the scores, clipped."""
    keypoints, scores = np.asarray(keypoints, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if keypoints.ndim != 3 or len(keypoints) == 0:
        return None
    best = int(np.argmax(scores[:, :18].mean(axis=1)))
    kp, sc = keypoints[best], scores[best]

    def rows(idx) -> np.ndarray:
        out = np.zeros((len(idx), 3))
        ok = (
            (sc[idx] >= threshold)
            & (kp[idx, 0] >= 0)
            & (kp[idx, 0] <= width)
            & (kp[idx, 1] >= 0)
            & (kp[idx, 1] <= height)
        )
        out[ok] = np.column_stack([kp[idx][ok], np.clip(sc[idx][ok], 1e-3, 1.0)])
        return out

    body = rows(np.arange(18))
    if not (body[:, 2] > 0).any():
        return None
    hand_rows = np.stack([rows(np.arange(92, 113)), rows(np.arange(113, 134))]) if hands else None
    face_rows = np.concatenate([rows(np.arange(24, 92)), np.zeros((2, 3))]) if face else None  # + 2 pupils OpenPose has
    return Pose(width, height, body, hands=hand_rows, face=face_rows)


DWPOSE_HOST = "download.openmmlab.com"


class DwposeDetector:
    """DWPose through rtmlib (``Wholebody``, onnxruntime on CPU or CUDA): body, hands, face."""

    name = "dwpose"

    def __init__(self, mode: str = "balanced", det: str = "", pose: str = "", device: str = "cpu",
                 hands: bool = False, face: bool = False, estimator=None):  # fmt: skip
        """``det``/``pose``: local ``.onnx`` files, or "" for rtmlib's models of ``mode`` (downloaded from
        OpenMMLab's server once into rtmlib's cache); ``estimator`` replaces the model (tests)."""
        self.hands, self.face = hands, face
        self.estimator = estimator if estimator is not None else load_dwpose(mode, det, pose, device)

    def detect(self, image: Image.Image, keypoints_path: Path | None = None) -> Pose | None:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()
        keypoints, scores = self.estimator(bgr)
        return pose_from_wholebody(keypoints, scores, *image.size, self.hands, self.face)


def load_dwpose(mode: str, det: str, pose: str, device: str):
    """rtmlib's ``Wholebody`` with OpenPose-ordered output; fails at once, naming the files and where they
    go, when the weights are neither local, cached, nor downloadable."""
    try:
        from rtmlib import Wholebody
        from rtmlib.tools.file import _get_rtmhub_dir
    except ImportError as err:
        raise ValueError(
            f"extract_poses.detector: dwpose needs rtmlib and onnxruntime ({err}); run make install"
        ) from err
    urls = Wholebody.MODE[mode]
    cache = Path(_get_rtmhub_dir()) / "checkpoints"
    missing = []
    for given, url in ((det, urls["det"]), (pose, urls["pose"])):
        if given:
            if not Path(given).is_file():
                raise FileNotFoundError(
                    f"DWPose weights {given}: no such file (extract_poses.dwpose_det / dwpose_pose)"
                )
        elif not (cache / (Path(url).name.split(".")[0] + ".onnx")).exists():
            missing.append(url)
    if missing and not hub.reachable(DWPOSE_HOST):
        raise OSError(
            f"DWPose weights are not on this machine and {DWPOSE_HOST} cannot be reached: download "
            + " and ".join(missing)
            + f" on a connected machine, unzip each end2end.onnx, and either put it in {cache} named after its zip "
            "(e.g. rtmw-dw-x-l_simcc-cocktail14_270e-384x288_20231122.onnx) or set extract_poses.dwpose_det / "
            "dwpose_pose to the .onnx paths"
        )
    kwargs = {"det": det or None, "pose": pose or None}
    if det:
        kwargs["det_input_size"] = urls["det_input_size"]
    if pose:
        kwargs["pose_input_size"] = urls["pose_input_size"]
    return Wholebody(mode=mode, to_openpose=True, backend="onnxruntime", device=device, **kwargs)


def make_detector(name: str, e=None, device: str = "cpu") -> Detector:
    """The detector called ``name`` in params (``extract_poses.detector``), configured by the
    ``extract_poses`` section ``e`` (weights, hands, face)."""
    if name == "sidecar":
        return SidecarDetector()
    if name == "openpose":
        return OpenposeDetector(e.openpose_weights, hands=e.hands, face=e.face)
    if name == "dwpose":
        return DwposeDetector(e.dwpose_mode, e.dwpose_det, e.dwpose_pose, device, hands=e.hands, face=e.face)
    if name == "world":  # the procedural world's heatmap network (posebooth world pretrain), a folder or embedded
        from posebooth import embedded
        from posebooth.world.posenet import WorldPoseDetector

        return WorldPoseDetector(embedded.resolve(e.world_weights), device)
    raise ValueError(f"extract_poses.detector: unknown detector {name!r}; available: {list(DETECTORS)}")
