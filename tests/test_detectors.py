"""Pose detectors: the sidecar, controlnet_aux's OpenPose (real code path, weights built in code), errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

from posebooth import config, hub
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


def settings(**change):
    """An ``extract_poses`` section as params.yaml has it, with ``change``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["extract_poses"] | change
    return config.build_section("extract_poses", raw)


def test_openpose_from_a_local_folder_runs_offline(random_openpose_weights):
    import torch

    detector = make_detector("openpose", settings(openpose_weights=str(random_openpose_weights)))
    model = detector.estimator.model
    saved = torch.load(random_openpose_weights / "body_pose_model.pth", weights_only=True)  # tensors only
    loaded = {".".join(k.split(".")[1:]): v for k, v in model.state_dict().items()}  # the file's key layout
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)

    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((args[0].clone(), [o.shape for o in out])))
    detector.detect(Image.new("RGB", (64, 64), (255, 128, 0)))
    # One pass at scale 0.5 * 368 / 64: a 184 px square (a multiple of the stride 8, no padding), BGR, x / 256 - 0.5.
    seen_input, shapes = seen[0]
    expected = torch.tensor([0 / 256 - 0.5, 128 / 256 - 0.5, 255 / 256 - 0.5]).view(1, 3, 1, 1).expand(1, 3, 184, 184)
    assert len(seen) == 1 and torch.equal(seen_input, expected)
    assert shapes == [(1, 38, 23, 23), (1, 19, 23, 23)]  # part affinity fields and heatmaps at 1/8


def test_openpose_offline_fails_at_once_naming_the_weights(monkeypatch, tmp_path, refused_connections):
    """Without the offline flag, when the Hub does not answer: one probe, no download tried (huggingface_hub
    would retry for ~25 s), and an error naming the weights and how to get them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    hub.reachable.cache_clear()
    with pytest.raises(
        OSError,
        match=r"OpenPose body weights \(body_pose_model.pth\) 'lllyasviel/Annotators' is not on this machine.*hf download lllyasviel/Annotators",
    ):
        make_detector("openpose", settings())
    assert [port for _, port in refused_connections] == [443]  # the probe, and nothing after it
    hub.reachable.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"the folder has no body_pose_model.pth"):
        make_detector("openpose", settings(openpose_weights=str(tmp_path)))


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


def _wholebody(n_people: int = 2):
    """rtmlib Wholebody output in OpenPose order: (N, 134, 2) keypoints and (N, 134) scores."""
    kp = np.zeros((n_people, 134, 2))
    sc = np.zeros((n_people, 134))
    for p in range(n_people):
        kp[p, :, 0] = np.linspace(10, 50, 134) + p
        kp[p, :, 1] = np.linspace(5, 40, 134)
        sc[p] = 0.5 + 0.2 * p  # the second person scores higher
    sc[:, 3] = 0.1  # under DWPose's 0.3: absent
    return kp, sc


def test_wholebody_output_becomes_an_openpose_pose():
    from posebooth.detectors import pose_from_wholebody

    kp, sc = _wholebody()
    pose = pose_from_wholebody(kp, sc, 64, 48, hands=True, face=True)
    assert pose.keypoints.shape == (18, 3) and pose.keypoints[0, 0] == pytest.approx(kp[1, 0, 0])  # best person
    assert not pose.visible[3] and pose.visible.sum() == 17
    assert pose.hands.shape == (2, 21, 3) and pose.hands[0, 0, 0] == pytest.approx(kp[1, 92, 0])  # left hand first
    assert pose.face.shape == (70, 3) and not (pose.face[68:, 2] > 0).any()  # DWPose has no pupils
    assert pose_from_wholebody(np.zeros((0, 134, 2)), np.zeros((0, 134)), 64, 48, False, False) is None
    assert pose_from_wholebody(kp, np.zeros_like(sc), 64, 48, False, False) is None


def test_dwpose_detector_with_an_injected_estimator():
    from posebooth.detectors import DwposeDetector

    seen = []

    def estimator(bgr):
        seen.append(bgr.shape)
        return _wholebody(1)

    det = DwposeDetector(estimator=estimator)
    pose = det.detect(Image.new("RGB", (64, 48)))
    assert det.name == "dwpose" and seen == [(48, 64, 3)] and pose.hands is None and pose.visible.sum() == 17


def test_dwpose_offline_fails_at_once_naming_the_files(monkeypatch, tmp_path, refused_connections):
    pytest.importorskip("rtmlib")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty rtmlib cache
    monkeypatch.delenv("TORCH_HOME", raising=False)
    with pytest.raises(OSError, match=r"DWPose weights are not on this machine.*rtmw-dw-.*\.zip.*dwpose_pose"):
        make_detector("dwpose", settings(detector="dwpose"))
    assert refused_connections == []  # offline (the session's flag): no download tried
    with pytest.raises(FileNotFoundError, match=r"DWPose weights .*nope.onnx: no such file"):
        make_detector("dwpose", settings(detector="dwpose", dwpose_pose=str(tmp_path / "nope.onnx")))


class HeadAndArmsStub:
    """controlnet_aux ``Body`` stand-in: one person, 18 hand-placed keypoints on a 256 px image."""

    POINTS = {
        0: (128, 60),  # nose
        1: (128, 100),  # neck
        2: (60, 100),  # right shoulder, elbow, wrist: the arm hangs down
        3: (60, 140),
        4: (60, 180),
        5: (100, 100),  # left shoulder, elbow, wrist: the arm points right
        6: (140, 100),
        7: (180, 100),
        8: (110, 170),  # hips, knees, ankles
        9: (110, 200),
        10: (110, 230),
        11: (146, 170),
        12: (146, 200),
        13: (146, 230),
        14: (120, 56),  # right eye, left eye, right ear, left ear
        15: (136, 56),
        16: (112, 60),
        17: (144, 60),
    }

    def __call__(self, bgr):
        candidate = np.array([[x, y, 0.9, i] for i, (x, y) in self.POINTS.items()], dtype=float)
        subset = np.concatenate([np.arange(18), [16.2, 18]])[None]
        return candidate, subset

    format_body_result = staticmethod(StubEstimator.format_body_result)


def test_openpose_hands_and_face_with_injected_models():
    crops = []

    class HandStub:
        def __call__(self, crop):
            crops.append(crop.shape)
            return np.tile([2.0, 3.0], (21, 1))  # every point 2, 3 px into its crop

    class FaceStub:
        def __call__(self, crop):
            crops.append(crop.shape)
            return "heatmaps"

        @staticmethod
        def compute_peaks_from_heatmaps(heatmaps):
            return np.tile([1.0, 2.0], (70, 1))  # every point 1, 2 px into its crop

    det = OpenposeDetector("unused", HeadAndArmsStub(), hand=HandStub(), face_model=FaceStub())
    image = Image.new("RGB", (256, 256), (90, 90, 90))
    pose = det.detect(image)
    assert pose.visible.sum() == 18
    # OpenPose's hand box (controlnet_aux handDetect): centre wrist + 0.33 (wrist - elbow), side
    # 1.5 max(|wrist - elbow|, 0.9 |elbow - shoulder|) = 60. Left: centre (193.2, 100) -> corner (163, 70);
    # right: centre (60, 193.2) -> corner (30, 163). The face box (faceDetect): half-side
    # max(3 * 8 (eyes), 1.5 * 16 (ears)) = 24 around the nose -> corner (104, 36), side 48.
    assert crops == [(60, 60, 3), (60, 60, 3), (48, 48, 3)]
    assert pose.hands.tolist() == [[[165.0, 73.0, 1.0]] * 21, [[32.0, 166.0, 1.0]] * 21]  # left hand first
    assert pose.face.tolist() == [[105.0, 38.0, 1.0]] * 70
    plain = OpenposeDetector("unused", HeadAndArmsStub()).detect(image)
    assert plain.hands is None and plain.face is None
