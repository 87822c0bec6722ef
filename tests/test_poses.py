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


def test_a_pose_drawn_at_a_width_and_height_is_letterboxed_into_it():
    """``posebooth generate --width/--height``: a square pose on a 96 x 32 canvas fills the middle 32 x 32, with
    black bands on both sides (not stretched across); at a square size it is ``render_pose``'s map."""
    from posebooth.poses import render_pose_size

    pose = load_pose(ROOT / "data" / "target_poses" / "t_pose.json")  # arms spread to the canvas' sides
    assert pose.width == pose.height
    wide = np.asarray(render_pose_size(pose, 96, 32, 512))
    assert wide.shape == (32, 96, 3)
    assert wide[:, :32].max() == 0 and wide[:, 64:].max() == 0 and (wide[:, 32:64].sum(-1) > 0).mean() > 0.02
    tall = np.asarray(render_pose_size(pose, 32, 96, 512))
    assert tall.shape == (96, 32, 3) and tall[:32].max() == 0 and tall[64:].max() == 0
    assert np.array_equal(np.asarray(render_pose_size(pose, 64, 64, 512)), np.asarray(render_pose(pose, 64, 512)))


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


QUADRUPED = {
    "name": "quadruped",
    "keypoints": ["nose", "withers", "tail", "left_front_paw", "right_front_paw", "left_hind_paw", "right_hind_paw"],
    "limbs": [["nose", "withers"], ["withers", "tail"], ["withers", "left_front_paw"],
              ["withers", "right_front_paw"], ["tail", "left_hind_paw"], ["tail", "right_hind_paw"]],
    "colors": [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]],
}  # fmt: skip


def _custom(**change):
    kp = {"nose": [60, 40, 1], "withers": [120, 60, 1], "tail": [300, 60, 1], "left_front_paw": [110, 200, 0.9],
          "right_front_paw": [140, 200, 0.9], "left_hind_paw": [290, 200, 0.8]}  # fmt: skip
    doc = {"format": "custom", "width": 400, "height": 250, "skeleton": QUADRUPED, "keypoints": kp}
    doc.update(change)
    return doc


def test_custom_skeleton_reads_renders_in_its_own_colours_and_round_trips(tmp_path):
    from posebooth.poses import parse_pose

    pose = parse_pose(_custom(), "dog.json")
    assert pose.skeleton.name == "quadruped" and pose.keypoints.shape == (7, 3)
    assert not pose.visible[6]  # right_hind_paw not given: absent
    assert parse_pose(pose.to_json(), "again").keypoints.tolist() == pose.keypoints.tolist()
    image = np.asarray(render_pose(pose, 256, 512))
    colours = {tuple(int(v * 0.6) for v in c) for c in QUADRUPED["colors"][:5]}  # the drawn limbs, at 60 %
    present = {tuple(p) for p in image.reshape(-1, 3)}
    assert colours <= present  # every limb with both ends present is drawn in its own colour
    assert tuple(int(v * 0.6) for v in QUADRUPED["colors"][5]) not in present  # its paw is absent: not drawn
    assert image[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(keypoints={"nose": [1, 2, 1], "paw": [3, 4, 1]}), r"unknown keypoint name\(s\) \['paw'\]"),
        (dict(keypoints={"nose": [float("nan"), 2, 1]}), r"'nose' has a NaN"),
        (dict(keypoints={"nose": [900, 2, 1]}), r"'nose' at \(900, 2\) lies outside the 400 x 250"),
        (dict(keypoints=[[1, 2, 1]]), r"keypoints must be an object"),
        (dict(skeleton=QUADRUPED | {"limbs": [["nose", "ear"]], "colors": [[1, 2, 3]]}), r"unknown keypoint 'ear'"),
        (dict(skeleton=QUADRUPED | {"colors": [[1, 2, 3]]}), r"one \[r, g, b\] per limb \(6\)"),
        (dict(skeleton=QUADRUPED | {"keypoints": ["nose", "nose"], "limbs": [], "colors": []}), r"repeated name"),
        (dict(skeleton=QUADRUPED | {"colors": [[300, 0, 0]] * 6}), r"colour \[300, 0, 0\]"),
    ],
)
def test_invalid_custom_files_name_the_file(tmp_path, change, message):
    path = tmp_path / "dog.json"
    path.write_text(json.dumps(_custom(**change)))
    with pytest.raises(PoseError, match=rf"dog.json: .*{message}"):
        load_pose(path)


def test_hands_and_face_are_validated_and_drawn():
    from posebooth.poses import parse_pose

    doc = _doc()
    doc["hands"] = [[[30 + i, 50, 1] for i in range(21)], [[0, 0, 0]] * 21]
    doc["face"] = [[50 + i % 10, 10 + i // 10, 1] for i in range(70)]
    pose = parse_pose(doc, "p.json")
    assert pose.hands.shape == (2, 21, 3) and pose.face.shape == (70, 3)
    with_parts = np.asarray(render_pose(pose, 128, 512))
    without = np.asarray(render_pose(parse_pose(_doc(), "q.json"), 128, 512))
    assert (with_parts != without).any()
    with pytest.raises(PoseError, match=r"p.json: hands\[0\] needs 21 keypoints, got 3"):
        parse_pose(doc | {"hands": [[[1, 1, 1]] * 3, [[1, 1, 1]] * 21]}, "p.json")
    with pytest.raises(PoseError, match=r"p.json: unknown field\(s\) \['feet'\]"):
        parse_pose(doc | {"feet": []}, "p.json")


def test_mirror_and_scale():
    from posebooth.poses import mirror_pose, parse_pose, scale_pose

    dog = parse_pose(_custom(), "dog.json")
    m = mirror_pose(dog)
    names = dog.skeleton.names
    assert m.keypoints[names.index("right_front_paw")].tolist() == [400 - 110, 200, 0.9]  # the left paw, mirrored
    assert not m.visible[names.index("left_hind_paw")]  # the absent right hind paw is now the left one
    # Four visible points on a 100 x 80 canvas; their box is x 20..60, y 10..50, centre (40, 30) (their mean,
    # (33.5, 23.5), is not it; nor is the box of all 18 rows, absent ones at (0, 0) included).
    kp = np.zeros((18, 3))
    kp[[0, 1, 4, 7]] = [[20, 10, 0.9], [60, 20, 0.8], [30, 50, 0.7], [24, 14, 0.6]]
    pose = Pose(100, 80, kp)
    half = np.zeros((18, 3))
    half[[0, 1, 4, 7]] = [[30, 20, 0.9], [50, 25, 0.8], [35, 40, 0.7], [32, 22, 0.6]]  # halfway to (40, 30)
    assert scale_pose(pose, 0.5).keypoints.tolist() == half.tolist()
    double = np.zeros((18, 3))
    double[[1, 4]] = [[80, 10, 0.8], [20, 70, 0.7]]  # (0, -10) and (8, -2) leave the canvas: absent
    assert scale_pose(pose, 2.0).keypoints.tolist() == double.tolist()


def test_target_pose_library_takes_files_images_and_variants(tmp_path):
    from PIL import Image

    from posebooth.poses import load_target_poses

    folder = tmp_path / "target_poses"
    folder.mkdir()
    (folder / "dog.json").write_text(json.dumps(_custom()))
    Image.new("RGB", (64, 48)).save(folder / "ref.png")
    found = Pose(64, 48, np.tile([10.0, 20.0, 1.0], (18, 1)))
    entries = [str(folder / "dog.json"), str(folder / "dog.json#mirror"), str(folder / "dog.json#mirror,scale=0.5"),
               str(folder / "ref.png")]  # fmt: skip
    poses = load_target_poses(entries, folder, detect=lambda image: found)
    assert list(poses) == ["dog", "dog_mirror", "dog_mirror_x0.5", "ref"]
    assert poses["ref"] is found
    with pytest.raises(PoseError, match=r"ref.png is an image; reading its pose needs extract_poses.detector"):
        load_target_poses([str(folder / "ref.png")], folder)
    with pytest.raises(PoseError, match=r"the detector found no pose in it"):
        load_target_poses([str(folder / "ref.png")], folder, detect=lambda image: None)
    with pytest.raises(PoseError, match=r"unknown modifier 'flip'"):
        load_target_poses([str(folder / "dog.json#flip")], folder)
    with pytest.raises(PoseError, match=r"scale must be a positive number"):
        load_target_poses([str(folder / "dog.json#scale=-1")], folder)


def test_pose_command_writes_target_poses_from_files_and_images(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from posebooth import cli, detectors
    from posebooth.poses import mirror_pose, scale_pose

    wave = ROOT / "data" / "target_poses" / "wave.json"
    out = tmp_path / "wave_mirror.json"
    cli.main(
        ["--params", str(ROOT / "params.yaml"), "pose", str(wave), "--mirror", "--scale", "0.8", "--out", str(out)]
    )
    expected = scale_pose(mirror_pose(load_pose(wave)), 0.8)
    assert np.allclose(load_pose(out).keypoints, expected.keypoints, atol=1e-3)

    found = Pose(64, 48, np.tile([10.0, 20.0, 1.0], (18, 1)))

    class Stub:
        name = "openpose"

        def detect(self, image, keypoints_path=None):
            return found

    monkeypatch.setattr(detectors, "make_detector", lambda name, e, device: Stub())
    Image.new("RGB", (64, 48)).save(tmp_path / "ref.png")
    cli.main(["--params", str(ROOT / "params.yaml"), "pose", str(tmp_path / "ref.png"), "--detector", "openpose",
              "--out", str(tmp_path / "ref.json")])  # fmt: skip
    assert load_pose(tmp_path / "ref.json").keypoints.tolist() == found.keypoints.tolist()
    sidecar = tmp_path / "params.yaml"  # extract_poses.detector: sidecar
    sidecar.write_text((ROOT / "params.yaml").read_text().replace("  detector: world ", "  detector: sidecar "))
    with pytest.raises(SystemExit):  # the sidecar detector cannot read an image: one-line error, exit 1
        cli.main(
            [
                "--params",
                str(sidecar),
                "pose",
                str(tmp_path / "ref.png"),
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
    assert "needs --detector openpose, dwpose or world" in caplog.text  # logged as one line


def test_a_custom_skeleton_sidecar_follows_the_photo_through_prepare(tmp_path):
    """A dog photo stored rotated (EXIF 6) with a quadruped sidecar: the keypoints follow rotation and crop,
    and the pose map is drawn in the skeleton's colours."""
    from PIL import Image

    from posebooth.prepare import prepare_folder

    stored = Image.new("RGB", (250, 400), (30, 30, 30))  # stored 250 x 400, shown 400 x 250 after rotation
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = tmp_path / "dog"
    folder.mkdir()
    stored.save(folder / "dog.jpg", exif=exif)
    doc = _custom(width=250, height=400, keypoints={"nose": [200, 200, 1], "withers": [190, 120, 1]})
    (folder / "dog.json").write_text(json.dumps(doc))
    kept, skipped = prepare_folder(folder, 64, 1)
    assert not skipped and kept[0].pose is not None
    pose = kept[0].pose
    assert pose.skeleton.name == "quadruped" and pose.visible.sum() == 2
    # EXIF 6 shows the stored image turned 90° clockwise: stored (x, y) -> shown (H - 1 - y, x) roughly; then a
    # centre crop of the 400 x 250 view to 250 x 250 (75 px off the left) scaled to 64 px.
    nose = pose.keypoints[0]
    assert nose[0] == pytest.approx((400 - 200 - 75) * 64 / 250, abs=1.5)
    assert nose[1] == pytest.approx(200 * 64 / 250, abs=1.5)
    image = np.asarray(render_pose(pose, 64, 512))
    assert image.any()  # the nose-withers limb, in its colour
