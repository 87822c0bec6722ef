"""Every kind of bad or odd input file, made here: each is used correctly or skipped with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from posebooth.prepare import prepare_folder


def _photo(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def _jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    _photo(1).save(d / "good.jpg")
    _photo(2).save(d / "naïve photo é.png")  # Unicode and spaces in the name
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(_jpeg_bytes(_photo(3))[:200])
    png = io.BytesIO()
    _photo(4).save(png, format="PNG")
    (d / "truncated.png").write_bytes(png.getvalue()[:120])
    (d / "text.jpg").write_text("not an image at all")
    _photo(5).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(96 * 80).reshape(80, 96) * 8).astype(np.uint16)).save(d / "deep16.png")
    _photo(6).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rgba = _photo(7).convert("RGBA")
    rgba.putalpha(0)  # fully transparent
    rgba.save(d / "transparent.png")
    _photo(8).convert("L").save(d / "grey.png")
    Image.new("RGB", (8, 8)).save(d / "tiny.png")
    frames = [_photo(9), _photo(10)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _photo(11).save(d / "a_orig.png")  # files are taken in name order: the first of a group is kept
    _photo(11).save(d / "b_same_pixels.bmp")  # exact duplicate of a_orig.png's pixels
    _photo(11).resize((192, 160)).save(d / "c_bigger_copy.jpg", quality=80)  # near duplicate: resized, re-encoded
    (d / "notes.txt").write_text("my notes")
    (d / "sub").mkdir()
    _photo(12).save(d / "sub" / "hidden.jpg")
    (d / "lonely.json").write_text("{}")
    return d


def test_every_odd_file_is_used_or_skipped_with_a_reason(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # so a 1000 x 1000 image is a "bomb" here
    Image.new("RGB", (1000, 1000)).save(folder / "bomb.png")
    kept, skipped = prepare_folder(folder, 32, 16)
    reasons = {s.source.name: s.reason for s in skipped}
    used = {k.source.name for k in kept}
    assert {"good.jpg", "naïve photo é.png", "cmyk.jpg", "deep16.png", "palette.png", "transparent.png",
            "grey.png", "animated.gif", "a_orig.png"} <= used  # fmt: skip
    assert "empty file" in reasons["empty.jpg"]
    for name in ("truncated.jpg", "truncated.png", "text.jpg"):
        assert "cannot be read as an image" in reasons[name], name
    assert "too small" in reasons["tiny.png"]
    assert "too many pixels" in reasons["bomb.png"]
    assert reasons["b_same_pixels.bmp"] == "duplicate of a_orig.png"
    assert reasons["c_bigger_copy.jpg"].startswith("near duplicate of a_orig.png")
    assert "no image of the same name" in reasons["notes.txt"] and "sub-folder" in reasons["sub"]  # a stray caption
    assert "no image of the same name" in reasons["lonely.json"]
    assert len(kept) + len(skipped) == len(list(folder.iterdir()))  # every entry accounted for


def test_conversions_are_right(folder, tmp_path):
    kept, _ = prepare_folder(folder, 32, 16, pad_color=(0, 255, 0))
    by = {k.source.name: np.asarray(k.image) for k in kept}
    assert by["transparent.png"].reshape(-1, 3).tolist().count([0, 255, 0]) == 32 * 32  # onto the pad colour
    deep = by["deep16.png"][..., 0]
    assert 0 < deep.mean() < 255 and deep.std() > 20  # scaled from 16 bits, not clipped to white
    grey = by["grey.png"]
    assert (grey[..., 0] == grey[..., 1]).all()
    # The CMYK JPEG, pixel by pixel and channel by channel, against its RGB original prepared the same way:
    # JPEG moves this smooth photo by at most 4 levels; an inverted CMYK reading moves it by over 100.
    rgb_dir = tmp_path / "rgb"
    rgb_dir.mkdir()
    _photo(5).save(rgb_dir / "cmyk_original.png")
    (original,), _ = prepare_folder(rgb_dir, 32, 16, pad_color=(0, 255, 0))
    diff = np.abs(by["cmyk.jpg"].astype(int) - np.asarray(original.image).astype(int))  # (32, 32, 3)
    assert diff.max() <= 10 and diff.mean() < 2, (diff.max(), diff.mean())
