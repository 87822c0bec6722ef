"""The world's pose detector: heatmap targets, sub-pixel decoding, a tiny training run, its saved files, the
detector protocol on them, and determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from posebooth.poses import OPENPOSE_18
from posebooth.world import posenet
from posebooth.world.dog import DOG_SKELETON

SEED = 7


def tiny_recipe(seed: int = SEED) -> dict:
    """Two steps on a few scenes, held-out figures on a few more."""
    return posenet.quick_recipe(posenet.RECIPE) | {"seed": seed, "eval_seed": seed + 100}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny detector folder and its record."""
    out = tmp_path_factory.mktemp("pose") / "pose"
    return out, posenet.train_pose_detector(tiny_recipe(), out)


def _weights(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / posenet.WEIGHTS_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _gaussian(h: int, w: int, u: float, v: float, sigma: float = 1.0) -> torch.Tensor:
    """(H, W) Gaussian peaking at heatmap column ``u``, row ``v`` (pixel-index units)."""
    rows, cols = torch.arange(h, dtype=torch.float64)[:, None], torch.arange(w, dtype=torch.float64)[None, :]
    return torch.exp(-((cols - u) ** 2 + (rows - v) ** 2) / (2 * sigma**2)).float()


def test_heatmap_target_peaks_at_the_keypoint_and_skips_absent_ones():
    # 64 px image, 32x32 heatmap: heatmap pixel j's centre is image pixel 2j + 1, so (21, 41) -> column 10,
    # row 20, exactly on a pixel centre (peak 1); half a pixel off would split it over two pixels (0.88)
    xy = torch.tensor([[[21.0, 41.0], [-3.0, 10.0], [50.0, 30.0]]])
    visible = torch.tensor([[True, False, True]])
    target = posenet.heatmap_targets(xy, visible, size=64, heatmap=32, sigma=1.0)
    assert target.shape == (1, 3, 32, 32)
    first = target[0, 0]
    row, col = divmod(int(first.argmax()), 32)
    assert (row, col) == (20, 10)
    assert first.max().item() == pytest.approx(1.0, abs=1e-6)
    assert first[20, 11].item() == pytest.approx(np.exp(-0.5), abs=1e-6)  # sigma of one heatmap pixel
    assert target[0, 1].abs().sum() == 0  # absent: no target at all
    # (50, 30) -> column 24.5, row 14.5: a tie between four pixels
    assert target[0, 2, 14:16, 24:26].numpy() == pytest.approx(np.full((2, 2), np.exp(-0.25)), abs=1e-6)


def test_scene_keypoints_use_the_class_channels_and_the_image_bounds():
    from posebooth.world import scenes

    rng = np.random.default_rng(3)
    drawn = [scenes.sample_scene(rng) for _ in range(12)]
    # a robot standing on the right edge: its left side lies outside the image
    edge = scenes.Placement(height=0.85, x=0.97, bottom=0.97, mirror=False, tilt=0.0)
    drawn.append(
        scenes.Scene(scenes.Instance("robot", "red", "round", "circle", "normal"), "down/straight", "beach", edge, 1)
    )
    assert {scene.subject.kind for scene in drawn} == {"robot", "dog", "vase"}
    for scene in drawn:
        xy, visible = posenet.scene_keypoints(scene, 64)
        pose = scenes.scene_pose(scene, 64)
        if pose is None:
            assert not visible.any()
            continue
        own, other = (slice(0, 18), slice(18, None))
        if scene.subject.kind == "dog":
            own, other = other, own
        assert not visible[other].any()
        assert (visible[own] == pose.visible).all()
        assert np.allclose(xy[own][visible[own]], pose.keypoints[pose.visible, :2], atol=1e-4)
    assert 0 < visible.sum() < 18  # the edge robot: some keypoints in, some out


def test_decoding_finds_a_sub_pixel_peak_on_the_original_canvas():
    # a 32x32 heatmap for a 200 x 120 image: heatmap pixel j spans image x [j, j + 1) * 200 / 32
    u, v = 10.3, 20.7
    heatmaps = torch.stack([_gaussian(32, 32, u, v), 0.5 * _gaussian(32, 32, 3.6, 25.2)])
    kp = posenet.decode_heatmaps(heatmaps, width=200, height=120)
    assert kp.shape == (2, 3)
    assert abs(kp[0, 0] - (u + 0.5) * 200 / 32) < 0.25 * 200 / 32
    assert abs(kp[0, 1] - (v + 0.5) * 120 / 32) < 0.25 * 120 / 32
    assert kp[0, 2] == pytest.approx(_gaussian(32, 32, u, v).max().item())
    assert abs(kp[1, 0] - 4.1 * 200 / 32) < 0.25 * 200 / 32 and abs(kp[1, 1] - 25.7 * 120 / 32) < 0.25 * 120 / 32


def test_decoding_maps_heatmap_pixel_centres_to_image_pixels():
    # on 64 px: the top-left heatmap pixel is image pixels [0, 2), centre 1; the middle of the heatmap
    # (between pixels 15 and 16) is the middle of the image, 32
    heatmaps = torch.stack([_gaussian(32, 32, 0.0, 0.0), _gaussian(32, 32, 15.5, 15.5), _gaussian(32, 32, 31, 31)])
    kp = posenet.decode_heatmaps(heatmaps, width=64, height=64)
    assert kp[:, :2] == pytest.approx(np.array([[1.0, 1.0], [32.0, 32.0], [63.0, 63.0]]), abs=0.1)


def test_targets_decode_back_to_their_keypoints():
    xy = torch.tensor([[[12.3, 50.8], [40.6, 7.2]]])
    target = posenet.heatmap_targets(xy, torch.ones(1, 2, dtype=torch.bool), size=64, heatmap=32, sigma=1.0)
    kp = posenet.decode_heatmaps(target[0], width=128, height=64)  # the image was 128 x 64 before resizing
    assert kp[:, :2] == pytest.approx(np.array([[24.6, 50.8], [81.2, 7.2]]), abs=0.05)


def test_heatmap_loss_weights_the_pixels_near_keypoints():
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 2] = 1.0
    logits = torch.zeros(1, 1, 4, 4)  # 0.5 everywhere: every pixel costs log 2
    assert posenet.heatmap_loss(logits, target, 0.0).item() == pytest.approx(16 * np.log(2))
    assert posenet.heatmap_loss(logits, target, 10.0).item() == pytest.approx((16 + 10) * np.log(2))
    confident = torch.where(target > 0, 20.0, -20.0)
    assert posenet.heatmap_loss(confident, target, 10.0).item() < 1e-6


def test_training_writes_fp16_weights_and_a_config_the_detector_loads(trained):
    out, record = trained
    assert np.isfinite(record["loss"]) and record["seconds"] > 0
    for name in ("clean", "blur_1.0"):
        figures = record["held_out"][name]
        assert figures["n_images"] == 12 and 0 < figures["n_poses"] <= 12
        assert 0 <= figures["class_accuracy"] <= 1
    weights = _weights(out)
    assert weights and all(t.dtype == torch.float16 for t in weights.values())
    assert (out / posenet.WEIGHTS_FILE).stat().st_size < 0.7e6
    config = json.loads((out / posenet.CONFIG_FILE).read_text())
    assert config["format"] == posenet.FORMAT
    assert config["skeletons"]["robot"]["keypoints"] == list(OPENPOSE_18.names)
    assert config["skeletons"]["dog"]["keypoints"] == list(DOG_SKELETON.names)

    detector = posenet.WorldPoseDetector(out)
    assert detector.name == "world"
    heatmaps, probabilities = detector.predict(Image.new("RGB", (64, 64)))
    assert heatmaps.shape == (18 + 13, 32, 32) and probabilities.shape == (3,)
    image = Image.new("RGB", (160, 96), (90, 140, 200))
    head = detector.model.class_head
    detector.threshold = -1.0  # every keypoint found, so that every one is checked
    for kind, skeleton in (("robot", OPENPOSE_18), ("dog", DOG_SKELETON), ("nothing", None)):
        with torch.no_grad():  # force the class head's answer
            head.weight.zero_()
            head.bias.copy_(torch.tensor([10.0 * (c == kind) for c in posenet.CLASSES]))
        pose = detector.detect(image)
        if skeleton is None:  # "nothing": the heatmaps decide; half of the keypoints are needed to overrule it
            robot = detector.predict(image)[0][posenet.CHANNELS["robot"]]
            peaks = np.sort(posenet.decode_heatmaps(robot, 160, 96)[:, 2])
            assert pose is not None and pose.skeleton == OPENPOSE_18  # every keypoint found
            detector.threshold = float(peaks[9]) + 1e-6  # 8 of 18 found: fewer than half
            assert detector.detect(image) is None
            detector.threshold = float(peaks[9]) - 1e-6  # 9 of 18 found: half
            assert detector.detect(image) is not None
            continue
        assert pose.skeleton == skeleton and pose.keypoints.shape == (len(skeleton.names), 3)
        assert (pose.width, pose.height) == (160, 96)
        assert (pose.keypoints[:, 2] > 0).all()
        # the keypoints are the class's own heatmaps decoded onto the 160 x 96 canvas
        expected = posenet.decode_heatmaps(detector.predict(image)[0][posenet.CHANNELS[kind]], 160, 96)
        assert pose.keypoints[:, :2] == pytest.approx(expected[:, :2].clip(0, [160, 96]))


def test_the_detector_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="posebooth world pretrain"):
        posenet.WorldPoseDetector(tmp_path / "nowhere")
    (tmp_path / posenet.CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        posenet.WorldPoseDetector(tmp_path)


def test_the_same_seed_gives_the_same_weights(trained, tmp_path):
    out, _ = trained
    posenet.train_pose_detector(tiny_recipe(), tmp_path / "again")
    posenet.train_pose_detector(tiny_recipe(SEED + 1), tmp_path / "other")
    first, again, other = _weights(out), _weights(tmp_path / "again"), _weights(tmp_path / "other")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_unknown_recipe_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['stpes'\\]"):
        posenet.train_pose_detector(tiny_recipe() | {"stpes": 3}, tmp_path)
