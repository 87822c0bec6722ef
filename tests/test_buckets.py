"""Aspect-ratio buckets: the bucket maths by hand, prepare_images into buckets (pixels, keypoints, SDXL's size
conditioning), and both training stages on batches of two bucket sizes (tiny models, a few steps)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from posebooth import augment, buckets, config, data
from posebooth.buckets import bucket_sizes, nearest_bucket
from posebooth.faces import face_crop_box
from posebooth.poses import load_pose
from posebooth.prepare import choose_box, prepare_folder, write_prepared
from tests.conftest import ROOT
from tests.profile import apply_profile
from tests.test_prior_batch import prepare_in, write_class_manifest

SIZE, STEP = 64, 16  # buckets of area 64²: (48, 80), (64, 64), (80, 48)
B = 2

# (file, photo size, a marked keypoint (the nose) and where it must land in the bucket's image)
PORTRAIT = ("portrait.png", (300, 400), (90, 300), (48, 80), (12, 60))  # crop (30, 0, 270, 400), x 0.2
LANDSCAPE = ("landscape.png", (400, 300), (300, 90), (80, 48), (60, 12))  # crop (0, 30, 400, 270), x 0.2


# --- the maths ------------------------------------------------------------------------------------------------------


def test_bucket_sizes_by_hand():
    assert bucket_sizes(SIZE * SIZE, STEP, 2.0) == [(48, 80), (64, 64), (80, 48)]  # 32 x 128 is 4:1: too long
    # SD 1.5 at 512: kohya's buckets within 2:1
    assert bucket_sizes(512 * 512, 64, 2.0) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    # SDXL at 1024: the familiar ones, and the transposes of each width's largest (1280 x 768 gives 768 x 1280)
    assert bucket_sizes(1024 * 1024, 64, 2.0) == [
        (704, 1408), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
        (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704),
    ]  # fmt: skip
    assert bucket_sizes(SIZE * SIZE, STEP, 1.0) == [(64, 64)]
    assert bucket_sizes(100 * 100, 64, 2.0) == [(64, 64), (64, 128), (128, 64)]  # the square even off the grid
    with pytest.raises(ValueError, match="prepare_images.bucket_step"):
        bucket_sizes(SIZE * SIZE, 128, 2.0)


def test_a_photo_goes_to_the_bucket_nearest_its_aspect_in_log_space():
    sizes = bucket_sizes(SIZE * SIZE, STEP, 2.0)
    assert nearest_bucket((300, 400), sizes) == (48, 80)
    assert nearest_bucket((400, 300), sizes) == (80, 48)
    # 0.79 is nearer 0.6 than 1.0 on a line, but nearer 1.0 in log space (their geometric mean is 0.775)
    assert nearest_bucket((79, 100), sizes) == (64, 64)
    assert nearest_bucket((100, 79), sizes) == (64, 64)
    # 1:2 is as far from 1:4 as from 1:1: the squarer bucket
    assert nearest_bucket((32, 64), [(16, 64), (64, 64)]) == (64, 64)
    assert nearest_bucket((32, 64), [(64, 64), (16, 64)]) == (64, 64)


def test_class_images_fitted_to_a_bucket_and_their_time_ids():
    """A 64 px square in the 48 x 80 bucket: a centred 38 x 64 crop (left 13), resized x 48/38; the crop's
    left in the image resized to match is 13 x 48/38 = 16.4."""
    pixels = torch.rand(3, 3, SIZE, SIZE)
    assert buckets.fit_pixels(pixels, (48, 80)).shape == (3, 3, 80, 48)
    assert buckets.fit_pixels(pixels, (SIZE, SIZE)) is pixels
    assert buckets.generated_time_ids(2, SIZE, (48, 80)).tolist() == [[64, 64, 0, 16, 80, 48]] * 2
    assert buckets.generated_time_ids(2, SIZE, (80, 48)).tolist() == [[64, 64, 16, 0, 48, 80]] * 2
    assert torch.equal(buckets.generated_time_ids(2, SIZE, (SIZE, SIZE)), data.generated_time_ids(2, SIZE))


def test_a_batch_draws_its_bucket_by_photo_count_and_one_bucket_draws_nothing():
    one = buckets.group([(64, 64)] * 3)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert buckets.draw(one, g) is one[0] and torch.equal(g.get_state(), state)  # the stream without buckets
    two = buckets.group([(48, 80), (80, 48), (48, 80), (48, 80)])
    assert [b.size for b in two] == [(48, 80), (80, 48)] and two[0].index.tolist() == [0, 2, 3]
    drawn = [buckets.draw(two, g).size for _ in range(4000)]
    assert drawn.count((48, 80)) / len(drawn) == pytest.approx(0.75, abs=0.03)
    again = torch.Generator().manual_seed(0)
    assert [buckets.draw(two, again).size for _ in range(50)] == drawn[:50]


def test_face_crop_of_a_bucket_aspect():
    from tests.test_prepare_crops import photo

    assert face_crop_box((400, 300), (0, 0, 20, 20), 0.6) == (0, 0, 180, 300)
    assert face_crop_box((400, 300), (380, 100, 20, 20), 0.6) == (220, 0, 400, 300)
    assert face_crop_box((400, 300), (180, 100, 40, 40)) == (50, 0, 350, 300)  # the square as before
    box, how, face = choose_box(photo(), "face", 0.6)  # a face at (300, 150) in a 400 x 300 photo
    assert how == "face" and (box[1], box[2] - box[0], box[3]) == (0, 180, 300)
    assert abs((box[0] + box[2]) / 2 - (face[0] + face[2] / 2)) <= 1  # centred on it


def test_bucket_step_must_be_a_multiple_of_the_latent_downsampling(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare_images"].update(buckets=True, bucket_step=12)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(config.ConfigError, match=r"prepare_images.bucket_step: 12 must be a multiple of 8"):
        config.load(["common", "prepare_images"], tmp_path / "params.yaml")
    params["prepare_images"]["buckets"] = False  # without buckets the step is not used: no error
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert config.load(["common", "prepare_images"], tmp_path / "params.yaml").prepare_images.bucket_step == 12


def test_zoomed_views_of_a_bucket_keep_its_aspect_and_the_face_box_follows():
    pixels = -torch.ones(1, 3, 80, 48)  # (N, 3, h, w) of the 48 x 80 bucket, a white box on black
    pixels[:, :, 30:50, 14:34] = 1.0
    views, boxes, windows = augment.crop_views(pixels, [(14, 30, 34, 50)], 5, 0.6, torch.Generator().manual_seed(3))
    assert views.shape == (1, 6, 3, 80, 48) and windows[0][0] == (0, 0, 48, 80)
    for k in range(1, 6):
        x, y, side, side_h = windows[0][k]
        assert 0.6 * 48 - 1 <= side <= 48 and x + side <= 48 and y + side_h <= 80 and abs(side_h - side * 80 / 48) <= 1
        white = (views[0, k, 0] > 0).nonzero()
        if boxes[0][k] is None:
            assert len(white) == 0
            continue
        (y0, x0), (y1, x1) = white.min(0).values.tolist(), white.max(0).values.tolist()
        assert boxes[0][k] == pytest.approx((x0, y0, x1 + 1, y1 + 1), abs=2)  # zoomed alike across and down


def test_a_bucket_off_the_latent_grid_stops_training_naming_the_key():
    buckets.check_latent_fit([(48, 80), (64, 64)], 8, SIZE)
    buckets.check_latent_fit([(100, 100)], 8, 100)  # the square, as without buckets: left as it was
    with pytest.raises(ValueError, match=r"prepare_images.bucket_step: the bucket 48x84 .* 8-pixel latent cells"):
        buckets.check_latent_fit([(48, 80), (48, 84)], 8, SIZE)


# --- prepare_images ---------------------------------------------------------------------------------------------


def _photo(folder, name, size, nose, colour=(30, 60, 90)):
    """A flat photo with a white 20 px square on the nose keypoint, and its sidecar: 18 keypoints near it."""
    image = Image.new("RGB", size, colour)
    x, y = nose
    image.paste((255, 255, 255), (x - 10, y - 10, x + 10, y + 10))
    image.save(folder / name)
    keypoints = [[x, y, 1.0]] + [[x + (k % 3) - 1, y - 2 - k % 4, 1.0] for k in range(17)]
    pose = {"format": "openpose-18", "width": size[0], "height": size[1], "keypoints": keypoints}
    (folder / name).with_suffix(".json").write_text(json.dumps(pose))


def _white_centre(image: Image.Image) -> tuple[float, float]:
    white = np.argwhere(np.asarray(image.convert("L")) > 200)  # (n, 2) rows, columns
    return float(white[:, 1].mean()) + 0.5, float(white[:, 0].mean()) + 0.5


def test_prepare_crops_each_photo_to_its_bucket_and_the_keypoints_follow(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size, nose, _, _ in (PORTRAIT, LANDSCAPE):
        _photo(photos, name, size, nose)
    kept, skipped = prepare_folder(photos, SIZE, 1, "centre", buckets=bucket_sizes(SIZE * SIZE, STEP, 2.0))
    assert not skipped
    by_source = {k.source.name: k for k in kept}
    for name, _, _, bucket, landed in (PORTRAIT, LANDSCAPE):
        item = by_source[name]
        assert item.image.size == bucket and item.record["bucket"] == list(bucket)
        assert (item.pose.width, item.pose.height) == bucket
        assert item.pose.keypoints[0, :2].tolist() == pytest.approx(landed)
        assert _white_centre(item.image) == pytest.approx(landed, abs=1.0)  # the pixels went there too
    portrait, landscape = by_source["portrait.png"].record, by_source["landscape.png"].record
    assert portrait["crop_box"] == [30, 0, 270, 400] and landscape["crop_box"] == [0, 30, 400, 270]
    # SDXL: the photo's size and the crop's top-left in the photo resized so that the crop fits the bucket
    assert portrait["original_size"] == [400, 300] and portrait["crop_top_left"] == [0, 6]
    assert landscape["original_size"] == [300, 400] and landscape["crop_top_left"] == [6, 0]

    data_dir = tmp_path / "prepared"
    write_prepared(data_dir, kept, skipped)
    names = [k.name for k in kept]
    ids = data.time_ids(data_dir, names, SIZE)  # (N, 6): original (h, w), crop (top, left), target (h, w)
    expected = {"portrait.png": [400, 300, 0, 6, 80, 48], "landscape.png": [300, 400, 6, 0, 48, 80]}
    assert ids.tolist() == [expected[k.source.name] for k in kept]
    # a zoomed view (stage 1's random_crops) of the portrait: its 24 x 40 px window at (0, 8), zoom 2, in the
    # photo resized to 60 px wide (the crop is 48): top (0 + 8) x 2, left (6 + 0) x 2, mirrored 120 - 12 - 48
    portrait_name = by_source["portrait.png"].name
    views = data.view_time_ids(data_dir, [portrait_name], SIZE, [[(0, 0, 48, 80), (0, 8, 24, 40)]])  # (1, 2, 2, 6)
    assert views[0, 1].tolist() == [[400, 300, 16, 12, 80, 48], [400, 300, 16, 60, 80, 48]]
    assert views[0, 0, 0].tolist() == expected["portrait.png"]
    saved = load_pose(data_dir / "keypoints" / f"{portrait_name}.json")
    assert (saved.width, saved.height) == (48, 80)
    _, groups, pixels = data.instance_buckets(data_dir, SIZE)
    assert sorted(g.size for g in groups) == [(48, 80), (80, 48)]
    assert sorted(p.shape[-2:] for p in pixels) == [(48, 80), (80, 48)]
    _, squares = data.instance_images(data_dir, SIZE)  # the metrics' references: centred squares
    assert squares.shape == (2, 3, SIZE, SIZE)


def test_pad_pads_a_photo_to_its_bucket_aspect(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (300, 400), (200, 10, 10)).save(photos / "a.png")
    (kept,), _ = prepare_folder(photos, SIZE, 1, "pad", (0, 0, 255), buckets=bucket_sizes(SIZE * SIZE, STEP, 2.0))
    assert kept.record["crop_box"] == [0, -50, 300, 450] and kept.image.size == (48, 80)
    pixels = np.asarray(kept.image)
    assert (pixels[:7, :, 2] > 200).all() and (pixels[:7, :, 0] < 50).all()  # 50 px of padding: 8 at x 0.16
    assert (pixels[9:-9, :, 0] > 150).all()


def test_without_buckets_the_photos_are_the_old_squares(tmp_path):
    """prepare_images.buckets false: exactly the centred square, resized as before (and the square's bucket)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size, nose, _, _ in (PORTRAIT, LANDSCAPE):
        _photo(photos, name, size, nose)
    kept, _ = prepare_folder(photos, SIZE, 1, "centre")
    for item in kept:
        with Image.open(item.source) as im:
            w, h = im.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            old = im.convert("RGB").crop(box).resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
        assert item.image.tobytes() == old.tobytes() and item.record["bucket"] == [SIZE, SIZE]
        assert item.record["crop_box"] == list(box)


# --- the training stages on two buckets -------------------------------------------------------------------------


def _workspace(tmp_path, monkeypatch, model: str) -> dict:
    """The current directory: params.yaml (test profile at 64 px in buckets of step 16), two portrait and two
    landscape photos with keypoints, prepared; three square class images, the first two with a pose."""
    photos = tmp_path / "data" / "subject"
    photos.mkdir(parents=True)
    for k in range(2):
        for name, size, nose, _, _ in (PORTRAIT, LANDSCAPE):
            _photo(photos, f"{k}_{name}", size, nose, colour=(30 + 80 * k, 60, 90))
        (photos / f"{k}_portrait.txt").write_text("standing tall")  # captions: the portraits only
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["common"].update(model=model, resolution=SIZE)
    params["prepare_images"].update(input_dir="data/subject", min_images=1, min_source_size=1, buckets=True,
                                    bucket_step=STEP)  # fmt: skip
    params["train"].update(steps=4, lr_warmup_steps=0, batch_size=B, prior_loss_weight=1.0, random_crops=1,
                           flip_prob=0.5, validation_every=0, checkpoint_every=0, export_kohya=False)  # fmt: skip
    xl = "xl" in model
    params["train_pose"].update(steps=3, batch_size=B, checkpoint_every=0, export=False, empty_prompt_prob=0.0,
                                controlnet=f"embedded:tiny-{'sdxl' if xl else 'sd15'}-openpose")  # fmt: skip
    prepare_in(tmp_path, monkeypatch, params)
    priors = tmp_path / "data" / "class_priors"
    (priors / "images").mkdir(parents=True)
    (priors / "keypoints").mkdir()
    for k in range(3):
        _photo(priors / "images", f"class_{k:04d}.png", (SIZE, SIZE), (32, 32), colour=(40 * k, 90, 200))
        if k < 2:  # pose-paired: the pose each was generated from
            shutil.move(priors / "images" / f"class_{k:04d}.json", priors / "keypoints" / f"class_{k:04d}.json")
        else:
            (priors / "images" / f"class_{k:04d}.json").unlink()
    write_class_manifest(priors, 3)
    return params


def _record_calls(module, calls: list) -> None:
    module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)


@pytest.mark.parametrize("model", ["embedded:tiny-sd15", "embedded:tiny-sdxl"])
def test_stage1_trains_on_batches_of_one_bucket_each(tiny_sd, tmp_path, monkeypatch, model):
    """Four steps of stage 1 on photos in two buckets: each batch is one bucket's size, the class half fitted
    to it; its photos' own captions (the portraits'); SDXL's time ids target the bucket, the class half's say
    how the square was fitted; the loss is finite."""
    from stages import train_stage1_appearance as stage

    _workspace(tmp_path, monkeypatch, model)
    calls, caption_rows, real_load, real_with_captions = [], [], stage.load_components, stage.with_captions

    def with_captions(chosen, rows, *args):
        caption_rows.append(rows.tolist())  # (B,) each sample's row of captioned prompts, -1 without a caption
        return real_with_captions(chosen, rows, *args)

    monkeypatch.setattr(stage, "with_captions", with_captions)

    def load_components(*args, **kwargs):
        comp = real_load(*args, **kwargs)
        _record_calls(comp.unet, calls)
        return comp

    monkeypatch.setattr(stage, "load_components", load_components)
    monkeypatch.setattr(sys, "argv", ["train_stage1_appearance"])
    stage.main()

    assert len(calls) == 4
    seen = set()
    for (args, kwargs), rows in zip(calls, caption_rows, strict=True):
        latents = args[0]  # (2B, 4, h, w)
        size = (latents.shape[-1] * 8, latents.shape[-2] * 8)
        assert latents.shape[0] == 2 * B and size in {(48, 80), (80, 48)}
        assert all(row >= 0 if size == (48, 80) else row == -1 for row in rows)  # a portrait batch: captioned
        seen.add(size)
        if "xl" in model:
            time_ids = kwargs["added_cond_kwargs"]["time_ids"]  # (2B, 6)
            assert time_ids[:, 4:].tolist() == [[size[1], size[0]]] * (2 * B)  # the bucket's (h, w)
            assert torch.equal(time_ids[B:], buckets.generated_time_ids(B, SIZE, size))
            assert {tuple(r) for r in time_ids[:B, :2].tolist()} <= {(400, 300), (300, 400)}
    assert seen == {(48, 80), (80, 48)}  # both buckets drawn in four steps (seed 0)
    metrics = json.loads((tmp_path / "metrics" / "train_stage1_appearance.json").read_text())
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize("model", ["embedded:tiny-sd15", "embedded:tiny-sdxl"])
def test_stage2_trains_on_pose_maps_of_each_bucket(tiny_sd, tmp_path, monkeypatch, model):
    """extract_poses draws each photo's pose map at the photo's bucket size; stage 2 (after stage 1) trains on
    batches of one bucket's (image, pose map) pairs, the class pairs fitted to it; SDXL's time ids target it."""
    from stages import extract_poses, train_stage1_appearance
    from stages import train_stage2_pose as stage

    _workspace(tmp_path, monkeypatch, model)
    for script in (extract_poses, train_stage1_appearance):
        monkeypatch.setattr(sys, "argv", [script.__name__])
        script.main()
    manifest = json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text())
    for record in manifest["images"]:
        with Image.open(tmp_path / "data" / "poses" / "maps" / f"{record['name']}.png") as im:
            assert list(im.size) == record["bucket"]
    report = json.loads((tmp_path / "data" / "poses" / "report.json").read_text())
    assert sum(r["used"] for r in report["images"] if r["kind"] == "class") == 2
    calls, real_controlnet = [], stage.load_controlnet

    def load_controlnet(*args, **kwargs):
        controlnet = real_controlnet(*args, **kwargs)
        _record_calls(controlnet, calls)
        return controlnet

    monkeypatch.setattr(stage, "load_controlnet", load_controlnet)
    monkeypatch.setattr(sys, "argv", ["train_stage2_pose"])
    stage.main()

    seen = set()
    for args, kwargs in calls:
        latents, cond = args[0], kwargs["controlnet_cond"]  # (2B, 4, h, w), (2B, 3, H, W)
        assert latents.shape[0] == cond.shape[0] == 2 * B  # instance pairs, then class pairs
        assert cond.shape[-2:] == (latents.shape[-2] * 8, latents.shape[-1] * 8)
        size = (cond.shape[-1], cond.shape[-2])
        seen.add(size)
        if "xl" in model:
            time_ids = kwargs["added_cond_kwargs"]["time_ids"]  # (2B, 6)
            assert time_ids[:, 4:].tolist() == [[size[1], size[0]]] * (2 * B)
            assert torch.equal(time_ids[B:], buckets.generated_time_ids(B, SIZE, size))
    assert seen == {(48, 80), (80, 48)}
    metrics = json.loads((tmp_path / "metrics" / "train_stage2_pose.json").read_text())
    assert np.isfinite(metrics["loss"]) and metrics["class_pairs"] == 2
