"""Metric functions against hand computation."""

from __future__ import annotations

import pytest
import torch

from posebooth.backbones import ClipEmbedder, DinoEmbedder, is_stand_in, lpips_distance
from posebooth.metrics import mean_matched_cosine, mean_pairwise_cosine, mean_pairwise_lpips


def test_pairwise_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert mean_pairwise_cosine(a, a) == pytest.approx(0.5)  # two 1s and two 0s
    assert mean_pairwise_cosine(a[:1], a[:1] * 3) == pytest.approx(1.0)
    assert mean_pairwise_cosine(a[:1], -a[:1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(a[:0], a)


def test_matched_cosine_by_hand():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert mean_matched_cosine(img, txt) == pytest.approx((1.0 + 2**-0.5) / 2)
    with pytest.raises(ValueError, match="CLIP-T needs matching"):
        mean_matched_cosine(img, txt[:1])


def test_lpips_diversity():
    lp = lpips_distance("random-alex")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    same, pairs = mean_pairwise_lpips([torch.cat([x, x, x])], lp)
    assert same == pytest.approx(0.0, abs=1e-6) and pairs == 3
    diff, pairs = mean_pairwise_lpips([torch.cat([x, y]), x], lp)  # the single-image group adds no pair
    assert diff > 0 and pairs == 1
    assert mean_pairwise_lpips([x], lp) == (None, 0)


def test_identical_images_score_one_with_stand_in_backbones(offline_env):
    from PIL import Image

    img = Image.new("RGB", (48, 48), (200, 30, 30))
    other = Image.new("RGB", (48, 48), (10, 10, 240))
    clip, dino = ClipEmbedder("embedded:tiny-clip"), DinoEmbedder("embedded:tiny-dino")
    for emb in (clip.images, dino.images):
        e = emb([img, other])
        assert mean_pairwise_cosine(e[:1], e[:1]) == pytest.approx(1.0, abs=1e-5)
        assert mean_pairwise_cosine(e[:1], e[1:]) < 0.9999
    t = clip.texts(["a photo of a robot", "a cat"])
    assert t.shape == (2, clip.model.config.projection_dim)
    assert is_stand_in("embedded:tiny-clip") and is_stand_in("random-alex") and not is_stand_in("facebook/dino-vits16")


def test_real_backbone_offline_fails_clearly(offline_env):
    with pytest.raises(OSError, match=r"metric backbone 'facebook/dino-vits16' is not on this machine.*hf download"):
        DinoEmbedder("facebook/dino-vits16")


def _kp(points: dict[int, tuple[float, float]]):
    import numpy as np

    kp = np.zeros((18, 3))
    for i, (x, y) in points.items():
        kp[i] = [x, y, 1.0]
    return kp


def test_pck_on_hand_placed_keypoints():
    from posebooth.metrics import pck, scale_pose_keypoints

    target = _kp({0: (0, 0), 1: (0, 100), 2: (50, 100)})  # bbox 50 x 100: scale 100
    assert pck(target, target, 0.2) == 1.0  # identical poses score 1
    near = _kp({0: (15, 0), 1: (0, 100), 2: (50, 100)})  # 15 px off: inside 0.2 * 100, outside 0.1 * 100
    assert pck(near, target, 0.2) == 1.0 and pck(near, target, 0.1) == pytest.approx(2 / 3)
    missing = _kp({0: (0, 0), 1: (0, 100)})  # a keypoint not detected counts as missed
    assert pck(missing, target, 0.2) == pytest.approx(2 / 3)
    swapped = _kp({0: (0, 0), 1: (50, 100), 2: (0, 100)})  # left/right swap: both swapped points miss
    assert pck(swapped, target, 0.2) == pytest.approx(1 / 3)
    assert pck(None, target, 0.2) == 0.0  # an empty detection
    assert pck(target, _kp({0: (5, 5)}), 0.2) is None  # one visible keypoint: no scale
    moved = scale_pose_keypoints(target, (100, 100), (50, 50))  # a pose on another canvas, rescaled
    assert (
        moved[2].tolist() == [25.0, 50.0, 1.0]
        and pck(moved, scale_pose_keypoints(target, (100, 100), (50, 50)), 0.1) == 1.0
    )


class _FixedDetector:
    """A detector that 'finds' a fixed keypoint array (or nothing) on every image."""

    name = "fixed"

    def __init__(self, keypoints):
        self.keypoints = keypoints

    def detect(self, image, keypoints_path=None):
        from posebooth.poses import Pose

        return None if self.keypoints is None else Pose(image.width, image.height, self.keypoints)


def test_pose_adherence_redetects_on_generated_images():
    from PIL import Image

    from posebooth.metrics import pose_adherence, scale_pose_keypoints
    from posebooth.poses import Pose

    target = Pose(512, 512, _kp({0: (100, 100), 1: (100, 300), 2: (300, 300)}))
    images = [Image.new("RGB", (64, 64))] * 3
    exact = scale_pose_keypoints(target.keypoints, (512, 512), (64, 64))  # the target on the 64 px image
    hit = pose_adherence(_FixedDetector(exact), images, [target] * 3)
    assert hit == {"detector": "fixed", "pck_0.2": 1.0, "detection_rate": 1.0, "n_images": 3}
    miss = pose_adherence(_FixedDetector(None), images, [target] * 3)
    assert miss["pck_0.2"] == 0.0 and miss["detection_rate"] == 0.0
