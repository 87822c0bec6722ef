"""Photos: EXIF orientation, crops, keypoints following them, skipped files, sources untouched."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from posebooth.images import EXIF_ORIENTATION, centre_crop_box, load_image, orient_points
from posebooth.poses import Pose
from posebooth.prepare import prepare_folder, write_prepared
from tests.conftest import ROOT


@pytest.mark.parametrize("orientation", range(1, 9))
def test_keypoints_follow_every_exif_orientation(orientation):
    """A marked pixel and its keypoint land on the same spot after exif_transpose."""
    w, h, (px, py) = 40, 24, (7, 5)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[py, px] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = orientation
    img.info["exif"] = exif.tobytes()
    img.getexif()[EXIF_ORIENTATION] = orientation
    shown = np.asarray(ImageOps.exif_transpose(img))
    ys, xs = np.nonzero(shown[..., 0])
    mapped = orient_points(np.array([[px + 0.5, py + 0.5]]), orientation, (w, h))[0]  # the pixel's centre
    assert (xs[0] + 0.5, ys[0] + 0.5) == pytest.approx(tuple(mapped))


def test_centre_crop_box():
    assert centre_crop_box(120, 160) == (0, 20, 120, 140)
    assert centre_crop_box(160, 120) == (20, 0, 140, 120)
    assert centre_crop_box(50, 50) == (0, 0, 50, 50)


def _sha(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prepare_sample_subject_keeps_sources_and_maps_keypoints(tmp_path):
    src = tmp_path / "photos"
    shutil.copytree(ROOT / "data" / "subject", src)
    before = _sha(src)
    kept, skipped = prepare_folder(src, 64, 32)
    assert not skipped and len(kept) == 6
    assert all(k.image.size == (64, 64) and k.pose is not None for k in kept)
    write_prepared(tmp_path / "out", kept, skipped)
    assert _sha(src) == before  # the user's photos are never modified
    rotated = next(k for k in kept if k.record["exif_orientation"] == 6)
    assert rotated.record["oriented_size"] == [128, 128] and rotated.record["exif_orientation"] == 6
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["name"] for r in manifest["images"]] == [k.name for k in kept]
    # The robot's head (nose keypoint) is orange (the world's (245, 130, 20)): the mapped keypoint must land on it
    # in every image, the one stored rotated included (its keypoints are in stored pixels).
    for k in kept:
        x, y, _ = k.pose.keypoints[0]
        r, g, b = np.asarray(k.image)[int(y), int(x)].astype(int)
        assert r > 200 and r - b > 100, (k.name, (r, g, b))


def test_bad_files_are_skipped_with_reasons(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    good = Image.new("RGB", (80, 90), (200, 10, 10))
    good.save(src / "a.png")
    good.save(src / "b_same_pixels.png")  # exact duplicate
    Image.new("RGB", (80, 90), (10, 200, 10)).save(src / "c.png")
    (src / "broken.jpg").write_text("not a jpeg")
    Image.new("RGB", (20, 20)).save(src / "tiny.png")
    (src / "notes.txt").write_text("not an image suffix")
    kept, skipped = prepare_folder(src, 32, 32)
    assert [k.source.name for k in kept] == ["a.png", "c.png"]
    reasons = {s.source.name: s.reason for s in skipped}
    assert set(reasons) == {"b_same_pixels.png", "broken.jpg", "tiny.png", "notes.txt"}
    assert "duplicate of a.png" in reasons["b_same_pixels.png"]
    assert "cannot be read as an image" in reasons["broken.jpg"]
    assert "too small: 20x20" in reasons["tiny.png"]


def test_sidecar_for_another_size_is_an_error(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    Image.new("RGB", (80, 90)).save(src / "a.png")
    doc = Pose(100, 100, np.zeros((18, 3))).to_json()
    (src / "a.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"a.json: keypoints are for a 100x100 image but a.png stores 80x90"):
        prepare_folder(src, 32, 16)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_images.input_dir"):
        prepare_folder(tmp_path / "nope", 32, 16)


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (10, 12), 128).save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.image.mode == "RGB" and loaded.stored_size == (10, 12) and loaded.orientation == 1


DREAMBENCH = ROOT.parent / "shared" / "dreambench"


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench is not beside the project")
@pytest.mark.parametrize("subject", ["dog", "candle", "backpack"])
def test_real_photos_from_outside_the_repository(tmp_path, subject):
    """DreamBench's real JPEGs, read where they are: prepared to size, sources untouched, no sidecars needed."""
    src = DREAMBENCH / subject
    before = _sha(src)
    kept, skipped = prepare_folder(src, 64, 256)
    assert len(kept) == len(list(src.glob("*.jpg"))) and not skipped
    assert all(k.image.size == (64, 64) and k.image.mode == "RGB" and k.pose is None for k in kept)
    assert len({k.record["sha256"] for k in kept}) == len(kept)
    write_prepared(tmp_path / "out", kept, skipped)
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == len(kept)
    assert _sha(src) == before
