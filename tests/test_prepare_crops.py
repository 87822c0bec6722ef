"""prepare_images, complete: face-aware crops, padding, HEIC and WebP, keypoints following every crop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from posebooth.faces import detect_faces, face_crop_box
from posebooth.images import load_image, pad_box
from posebooth.poses import KEYPOINT_NAMES, Pose
from posebooth.prepare import choose_box, prepare_folder
from tests.conftest import ROOT

DREAMBENCH = ROOT.parent / "shared" / "dreambench"


def draw_face(canvas: Image.Image, cx: int, cy: int, r: int) -> None:
    """A cartoon face that OpenCV's frontal-face Haar cascade detects (skin, hair, eyes, brows, nose, mouth)."""
    d = ImageDraw.Draw(canvas)
    d.ellipse([cx - r, cy - int(r * 1.3), cx + r, cy + int(r * 1.3)], fill=(224, 180, 150))
    d.ellipse([cx - r * 0.9, cy - int(r * 1.45), cx + r * 0.9, cy - int(r * 0.7)], fill=(60, 40, 30))
    for dx in (-0.38, 0.38):
        ex, ey = cx + dx * r, cy - 0.2 * r
        d.ellipse([ex - 0.2 * r, ey - 0.1 * r, ex + 0.2 * r, ey + 0.1 * r], fill=(255, 255, 255))
        d.ellipse([ex - 0.09 * r, ey - 0.09 * r, ex + 0.09 * r, ey + 0.09 * r], fill=(30, 20, 20))
        d.line(
            [ex - 0.25 * r, ey - 0.3 * r, ex + 0.25 * r, ey - 0.3 * r], fill=(60, 40, 30), width=max(2, int(0.08 * r))
        )
    d.polygon([(cx, cy - 0.1 * r), (cx - 0.12 * r, cy + 0.3 * r), (cx + 0.12 * r, cy + 0.3 * r)], fill=(200, 150, 120))
    d.ellipse([cx - 0.35 * r, cy + 0.5 * r, cx + 0.35 * r, cy + 0.7 * r], fill=(150, 60, 60))


def photo(size=(400, 300), faces=((300, 150, 60),)) -> Image.Image:
    img = Image.new("RGB", size, (90, 120, 160))
    for cx, cy, r in faces:
        draw_face(img, cx, cy, r)
    return img.filter(ImageFilter.GaussianBlur(1.5))


def test_face_crop_follows_the_face():
    img = photo()
    (face,) = detect_faces(img)
    assert abs(face[0] + face[2] / 2 - 300) < 15 and abs(face[1] + face[3] / 2 - 150) < 20
    box, how, found = choose_box(img, "face")
    assert how == "face" and found == list(face)
    assert box == (100, 0, 400, 300)  # the largest square, pushed right towards the face and clamped
    assert choose_box(img, "centre")[0] == (50, 0, 350, 300)


def test_largest_face_wins():
    img = photo(size=(600, 300), faces=((120, 150, 35), (450, 150, 70)))
    faces = detect_faces(img)
    assert len(faces) == 2
    box, how, found = choose_box(img, "face")
    assert how == "face (largest of 2)"
    cx = found[0] + found[2] / 2
    assert abs(cx - 450) < 20
    assert box[2] - box[0] == 300 and abs((box[0] + box[2]) / 2 - cx) <= 1  # centred on the larger face


def test_no_face_falls_back_to_centre_and_says_so(tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (300, 200), (10, 120, 40)).save(folder / "grass.png")
    photo().save(folder / "person.png")
    kept, _ = prepare_folder(folder, 32, 16, crop="face")
    crops = {k.source.name: k.record["crop"] for k in kept}
    assert crops == {"grass.png": "centre (no face found)", "person.png": "face"}
    assert "grass.png: no face found, centre crop instead" in caplog.text
    assert kept[1].record["face_box"] is not None and kept[0].record["face_box"] is None


def test_face_crop_box_clamps_inside_the_image():
    assert face_crop_box((400, 300), (0, 0, 20, 20)) == (0, 0, 300, 300)
    assert face_crop_box((300, 500), (100, 480, 20, 20)) == (0, 200, 300, 500)


@pytest.mark.parametrize("color", [(0, 0, 0), (255, 128, 0)])
def test_padding_keeps_the_whole_photo_and_keypoints_follow(tmp_path, color):
    folder = tmp_path / "photos"
    folder.mkdir()
    img = Image.new("RGB", (100, 50), (200, 200, 200))
    img.putpixel((90, 10), (255, 0, 0))
    img.save(folder / "wide.png")
    kp = np.zeros((len(KEYPOINT_NAMES), 3))
    kp[0] = [90.5, 10.5, 1.0]
    (folder / "wide.json").write_text(json.dumps(Pose(100, 50, kp).to_json()))
    (k,), _ = prepare_folder(folder, 100, 16, crop="pad", pad_color=color)
    assert k.record["crop"] == "pad" and k.record["crop_box"] == [0, -25, 100, 75] == list(pad_box(100, 50))
    arr = np.asarray(k.image)
    assert tuple(arr[5, 50]) == color and tuple(arr[95, 50]) == color  # bands above and below
    assert tuple(arr[50, 50]) == (200, 200, 200)
    x, y, c = k.pose.keypoints[0]
    assert (x, y, c) == (90.5, 35.5, 1.0) and tuple(arr[int(y), int(x)]) == (255, 0, 0)


def test_heic_and_webp_are_read(tmp_path):
    from pillow_heif import register_heif_opener

    register_heif_opener()
    base = photo(size=(120, 90), faces=((35, 40, 18),))
    base.save(tmp_path / "a.heic")
    base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "b.webp", lossless=True)  # another picture
    heic, webp = load_image(tmp_path / "a.heic"), load_image(tmp_path / "b.webp")
    assert heic.image.size == webp.image.size == (120, 90) and heic.image.mode == "RGB"
    kept, skipped = prepare_folder(tmp_path, 32, 16)
    assert {k.source.name for k in kept} == {"a.heic", "b.webp"} and not skipped


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench is not beside the project")
def test_every_dreambench_subject_prepares_without_failure(tmp_path):
    subjects = sorted(p for p in DREAMBENCH.iterdir() if p.is_dir())
    assert len(subjects) >= 10
    for subject in subjects:
        kept, skipped = prepare_folder(subject, 64, 256, crop="face")
        assert kept and not skipped, subject.name
        assert all(k.image.size == (64, 64) for k in kept)
