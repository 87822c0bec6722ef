"""Keypoint files: validation errors that name the file, crops, and black-background rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from posebooth.poses import KEYPOINT_NAMES, Pose, PoseError, crop_scale_pose, load_pose, render_pose
from tests.conftest import ROOT


def _doc(**change):
    kp = [[10.0 + i, 20.0 + i, 1.0] for i in range(18)]
    doc = {"format": "openpose-18", "width": 100, "height": 80, "keypoints": kp}
    doc.update(change)
    return doc


@pytest.mark.parametrize(
    "doc, message",
    [
        (_doc(keypoints=[[1, 2, 1]] * 17), r"needs 18 keypoints"),
        (_doc(format="coco"), r"format is 'coco'"),
        (_doc(width=0), r"width and height must be positive"),
        (_doc(keypoints=[[1, 2, 1]] * 17 + [[float("nan"), 2, 1]]), r"'left_ear' has a NaN"),
        (_doc(keypoints=[[1, 2, 1]] * 17 + [[500, 2, 1]]), r"'left_ear' at \(500, 2\) lies outside the 100 x 80"),
        (_doc(keypoints=[[1, 2, 1]] * 17 + [[1, 2, 2]]), r"confidence 2 is outside \[0, 1\]"),
        (_doc(keypoints=[[1, 2, 1]] * 17 + [[1, 2]]), r"'left_ear' must be \[x, y, confidence\]"),
    ],
)
def test_invalid_files_name_the_file(tmp_path, doc, message):
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(doc).replace("NaN", "NaN"))
    with pytest.raises(PoseError, match=rf"pose.json: .*{message}"):
        load_pose(path)


def test_absent_keypoints_may_lie_anywhere(tmp_path):
    doc = _doc()
    doc["keypoints"][3] = [999, -5, 0]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    pose = load_pose(path)
    assert not pose.visible[3] and pose.visible.sum() == 17


def test_crop_scale_pose_drops_points_outside():
    kp = np.zeros((18, 3))
    kp[0] = [50, 40, 1]  # inside the crop
    kp[1] = [5, 40, 1]  # left of the crop
    pose = crop_scale_pose(Pose(100, 80, kp), (10, 0, 90, 80), 40)
    assert pose.width == pose.height == 40
    assert pose.keypoints[0].tolist() == [20.0, 20.0, 1.0]
    assert not pose.visible[1]


def test_render_pose_black_background():
    pose = load_pose(ROOT / "data" / "target_poses" / "standing.json")
    img = np.asarray(render_pose(pose, 64))
    assert img.shape == (64, 64, 3)
    assert img[0, 0].tolist() == [0, 0, 0]  # black, not grey, padding
    assert (img.sum(-1) > 0).mean() > 0.02  # a skeleton is drawn
    empty = np.asarray(render_pose(Pose(10, 10, np.zeros((18, 3))), 32))
    assert empty.max() == 0


def test_sample_poses_are_valid():
    paths = sorted((ROOT / "data" / "subject").glob("*.json")) + sorted((ROOT / "data" / "target_poses").glob("*.json"))
    assert len(paths) == 10
    for path in paths:
        pose = load_pose(path)
        assert pose.visible.sum() == len(KEYPOINT_NAMES), path


def test_non_square_poses_are_letterboxed_not_stretched():
    from posebooth.poses import fit_square

    kp = np.zeros((18, 3))
    kp[0] = [100, 25, 1]  # right edge of a 100 x 50 canvas, half-way down
    kp[1] = [0, 0, 1]
    square = fit_square(Pose(100, 50, kp), 64)
    assert square.keypoints[0].tolist() == [64.0, 32.0, 1.0]  # scale 0.64, 16 px bands above and below
    assert square.keypoints[1].tolist() == [0.0, 16.0, 1.0]
    img = np.asarray(render_pose(Pose(100, 50, kp), 64, 256))
    assert img[:10].max() == 0 and img[-10:].max() == 0  # nothing drawn in the letterbox bands


def test_target_poses_must_live_in_the_tracked_folder_with_distinct_names(tmp_path):
    from posebooth.poses import load_target_poses

    folder = ROOT / "data" / "target_poses"
    poses = load_target_poses([str(folder / "wave.json"), str(folder / "t_pose.json")], folder)
    assert list(poses) == ["wave", "t_pose"]
    with pytest.raises(PoseError, match=r"two poses are named 'wave'"):
        load_target_poses([str(folder / "wave.json"), str(folder / "wave.json")], folder)
    elsewhere = tmp_path / "mine.json"
    elsewhere.write_text((folder / "wave.json").read_text())
    with pytest.raises(PoseError, match=r"sample.poses: .*mine.json must lie in target_poses/"):
        load_target_poses([str(elsewhere)], folder)
