"""Pose detectors: the sidecar, controlnet_aux's OpenPose (real code path, weights built in code), errors."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from PIL import Image

from posebooth import hub
from posebooth.detectors import OpenposeDetector, SidecarDetector, make_detector, pose_from_bodies
from posebooth.poses import Pose, PoseError
from tests.conftest import ROOT


def _body_result(points: dict[int, tuple[float, float, float]], total_score: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose.body import BodyResult, Keypoint
    kps = [Keypoint(*points[i], i) if i in points else None for i in range(18)]
    return BodyResult(keypoints=kps, total_score=total_score, total_parts=len(points))


def test_pose_from_bodies_takes_the_best_person():
    weak = _body_result({0: (10, 10, 0.5)}, total_score=1.0)
    strong = _body_result({0: (30, 20, 0.9), 1: (30, 30, 0.8), 17: (70, 5, 0.7)}, total_score=5.0)
    pose = pose_from_bodies([weak, strong], 64, 48)
    assert (pose.width, pose.height) == (64, 48)
    assert pose.keypoints[0].tolist() == [30, 20, 0.9] and pose.keypoints[1].tolist() == [30, 30, 0.8]
    assert pose.keypoints[17].tolist() == [64, 5, 0.7]  # clamped onto the canvas
    assert pose.visible.sum() == 3
    assert pose_from_bodies([], 64, 48) is None


class StubEstimator:
    """Stands in for controlnet_aux's Body: one person with a nose and a neck, in its (candidate, subset) form."""

    def __init__(self):
        self.seen = None

    def __call__(self, bgr):
        self.seen = bgr
        candidate = np.array([[12.0, 8.0, 0.9, 0], [12.0, 20.0, 0.7, 1]])  # x, y, score, id
        subset = np.full((1, 20), -1.0)
        subset[0, 0], subset[0, 1], subset[0, 18], subset[0, 19] = 0, 1, 1.6, 2
        return candidate, subset

    format_body_result = staticmethod(
        __import__("controlnet_aux.open_pose.body", fromlist=["Body"]).Body.format_body_result
    )


def test_openpose_detector_reads_the_estimator_output_in_bgr():
    est = StubEstimator()
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    pose = OpenposeDetector("unused", estimator=est).detect(img)
    assert est.seen[0, 0].tolist() == [0, 0, 255]  # OpenCV's BGR order
    assert pose.keypoints[:2].tolist() == [[12, 8, 0.9], [12, 20, 0.7]] and pose.visible.sum() == 2


@pytest.fixture(scope="module")
def random_openpose_weights(tmp_path_factory):
    """controlnet_aux's OpenPose body network with random weights, saved in the Annotators layout."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose.model import bodypose_model
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("annotators")
    state = {".".join(k.split(".")[1:]): v for k, v in bodypose_model().state_dict().items()}  # the file's keys
    torch.save(state, folder / "body_pose_model.pth")
    return folder


def test_openpose_from_a_local_folder_runs_offline(random_openpose_weights):
    detector = make_detector("openpose", str(random_openpose_weights))
    image = Image.open(ROOT / "data" / "subject" / "robot_03.png").convert("RGB").resize((64, 64))
    pose = detector.detect(image)  # random weights: a pose or none, but the real code path runs
    assert pose is None or isinstance(pose, Pose)


def test_openpose_offline_fails_within_seconds_naming_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # even without the flag, when the Hub does not answer

    def refuse(*args, **kwargs):
        raise OSError("connection refused (test)")

    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    hub.hub_reachable.cache_clear()
    start = time.monotonic()
    with pytest.raises(
        OSError,
        match=r"OpenPose weights \(body_pose_model.pth\) 'lllyasviel/Annotators' is not on this machine.*hf download lllyasviel/Annotators",
    ):
        make_detector("openpose", "lllyasviel/Annotators")
    assert time.monotonic() - start < 15
    hub.hub_reachable.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"the folder has no body_pose_model.pth"):
        make_detector("openpose", str(tmp_path))


def test_sidecar_detector(tmp_path):
    det = SidecarDetector()
    img = Image.new("RGB", (64, 64))
    assert det.detect(img, None) is None and det.detect(img, tmp_path / "none.json") is None
    path = tmp_path / "p.json"
    path.write_text(Pose(32, 32, np.zeros((18, 3))).to_json().__repr__().replace("'", '"'))
    with pytest.raises(PoseError, match="canvas 32x32 != image"):
        det.detect(img, path)


def test_unknown_detector():
    with pytest.raises(ValueError, match=r"extract_poses.detector: unknown detector 'magic'"):
        make_detector("magic")
