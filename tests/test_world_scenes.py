"""The procedural world: deterministic renders, keypoints in posebooth's format that sit on the drawn
body, a held-out subject, captions that match their scene, and backgrounds that tell contexts apart."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from posebooth.poses import KEYPOINT_NAMES, mirror_pose, parse_pose
from posebooth.world import (
    CLASSES,
    CONTEXTS,
    PALETTE,
    SUBJECT,
    Instance,
    background,
    caption,
    iter_scenes,
    keypoints_xy,
    render,
    sample_scene,
    scene_pose,
    subject_photos,
)

EVERY_WORD = {"colour": 1.0, "context": 1.0, "shape": 1.0, "marking": 1.0, "build": 1.0}


def test_same_seed_same_bytes_and_other_seeds_differ():
    scenes = list(iter_scenes(7, 12))
    assert scenes == list(iter_scenes(7, 12))  # the stream is deterministic
    for scene in scenes:
        (a, ka), (b, kb) = render(scene), render(scene)
        assert a.tobytes() == b.tobytes() and ka == kb
    others = list(iter_scenes(8, 12))
    assert all(s != o for s, o in zip(scenes, others, strict=True))
    images = [render(s)[0].tobytes() for s in scenes + others]
    assert len(set(images)) == len(images)
    # the same scene with another seed: same layout, other jitter and background details
    scene = scenes[0]
    assert render(scene)[0].tobytes() != render(replace(scene, seed=scene.seed + 1))[0].tobytes()


def test_keypoints_parse_with_posebooth_and_lie_inside_the_image():
    counts = {kind: 0 for kind in CLASSES}
    for scene in iter_scenes(1, 150):
        image, doc = render(scene, size=64)
        assert image.mode == "RGB" and image.size == (64, 64)
        counts[scene.subject.kind] += 1
        if scene.subject.kind == "vase":
            assert doc is None
            continue
        pose = parse_pose(doc, "test")  # raises on anything that is not posebooth's format
        assert doc["format"] == ("openpose-18" if scene.subject.kind == "robot" else "custom")
        assert (pose.width, pose.height) == (64, 64)
        xy = pose.keypoints[pose.visible, :2]
        assert ((xy >= 0) & (xy <= 64)).all()
        assert pose.visible.sum() >= len(pose.keypoints) - 4  # subjects are mostly in the frame
    assert min(counts.values()) > 30  # all three classes were drawn


def test_keypoints_follow_the_render_size():
    scene = next(iter_scenes(3, 1, classes=["robot"]))
    assert np.allclose(keypoints_xy(scene, 128), 2 * keypoints_xy(scene, 64))
    _, doc = render(scene, size=96)
    assert parse_pose(doc, "test").width == 96


def _near(image: np.ndarray, x: float, y: float, rgb) -> float:
    """The smallest largest-channel distance to ``rgb`` in the 3 x 3 pixels around (x, y)."""
    i, j = int(y), int(x)
    patch = image[i - 1 : i + 2, j - 1 : j + 2].reshape(-1, 3).astype(float)
    return float(np.abs(patch - np.array(rgb)).max(axis=1).min())


@pytest.mark.parametrize(
    ("kind", "names"), [("robot", ("neck", "right_hip", "left_hip", "nose")), ("dog", ("withers", "tail_base", "head"))]
)
def test_keypoints_sit_on_the_drawn_body(kind, names):
    checked = 0
    for scene in iter_scenes(2, 60, classes=[kind]):
        image, doc = render(scene)
        other = "blue" if scene.subject.colour != "blue" else "red"
        recoloured, _ = render(replace(scene, subject=replace(scene.subject, colour=other)))
        pixels, pixels2, bg = np.asarray(image), np.asarray(recoloured), np.asarray(background(scene))
        for name in names:
            pose = parse_pose(doc, "test")
            x, y, c = pose.keypoints[pose.skeleton.names.index(name)]
            if c == 0 or not (1 <= x < 63 and 1 <= y < 63):
                continue
            # the body's colour is there, and it is the body's: recolouring the subject recolours it
            assert _near(pixels, x, y, PALETTE[scene.subject.colour]) < 40, (scene, name)
            assert _near(pixels2, x, y, PALETTE[other]) < 40, (scene, name)
            i, j = int(y), int(x)
            if _near(bg, x, y, PALETTE[scene.subject.colour]) > 60:  # unlike the background there
                assert np.abs(pixels[i, j].astype(int) - bg[i, j]).max() > 40, (scene, name)
            checked += 1
    assert checked > 100


def test_background_is_the_render_without_its_subject():
    for scene in iter_scenes(4, 10, classes=["robot"]):
        image, bg = np.asarray(render(scene)[0]), np.asarray(background(scene))
        xy, h = keypoints_xy(scene), scene.placement.height * 64
        left, top = np.floor(xy.min(axis=0) - 0.2 * h - 3).astype(int)  # LANCZOS reaches 3 px out
        right, bottom = np.ceil(xy.max(axis=0) + 0.2 * h + 3).astype(int)
        outside = np.ones((64, 64), bool)
        outside[max(0, top) : bottom, max(0, left) : right] = False
        assert outside.sum() > 100
        assert (image[outside] == bg[outside]).all()
        assert (image[~outside] != bg[~outside]).any()  # and the subject was drawn


def test_the_held_out_subject_is_never_sampled_but_renders_on_request():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(20_000)]
    robots = [s.subject for s in scenes if s.subject.kind == "robot"]
    assert SUBJECT not in robots
    # only the combination is held out: robots sharing all but one of its attributes are common
    fields = ("colour", "shape", "marking", "build")
    for field in fields:
        others = [f for f in fields if f != field]
        near = [r for r in robots if all(getattr(r, f) == getattr(SUBJECT, f) for f in others)]
        assert len(near) > 5 and all(getattr(r, field) != getattr(SUBJECT, field) for r in near), field
    scene = sample_scene(rng, instance=SUBJECT)
    assert scene.subject == SUBJECT
    parse_pose(render(scene)[1], "test")
    assert sample_scene(np.random.default_rng(1), exclude=()).subject.kind in CLASSES

    photos = subject_photos(0, 8)
    assert [s.subject for s, _, _ in photos] == [SUBJECT] * 8
    assert len({s.pose for s, _, _ in photos}) == 8 and len({s.context for s, _, _ in photos}) == 8
    for _, image, doc in photos:
        assert image.size == (64, 64) and parse_pose(doc, "test").visible.sum() >= 14
    assert [s for s, _, _ in subject_photos(0, 3)] == [s for s, _, _ in photos[:3]]


def _colour_words(text: str) -> set[str]:
    return {c for c in PALETTE if re.search(rf"\b{c}\b", text)}


def test_captions_name_the_colour_and_context_of_their_scene():
    scenes = list(iter_scenes(5, 400))
    for scene in scenes:
        full = caption(scene, np.random.default_rng(0), keep=EVERY_WORD, class_only=0.0)
        phrase = CONTEXTS[scene.context].phrase
        assert scene.subject.kind in full and phrase in full, full
        assert _colour_words(full.replace(phrase, "")) == {scene.subject.colour}, full
    subject = sample_scene(np.random.default_rng(0), instance=SUBJECT)
    text = caption(subject, np.random.default_rng(0), keep=EVERY_WORD | {"build": 0.0}, class_only=0.0)
    assert "an orange triangle-headed robot with a star" in text

    rng, again = np.random.default_rng(1), np.random.default_rng(1)
    captions = [caption(s, rng) for s in scenes]
    assert captions == [caption(s, again) for s in scenes]  # deterministic given the generator
    coloured = 0
    for scene, text in zip(scenes, captions, strict=True):
        assert scene.subject.kind in text
        words = _colour_words(text.replace(CONTEXTS[scene.context].phrase, ""))
        assert words <= {scene.subject.colour}, text  # dropped, never wrong
        coloured += bool(words)
    assert 0.6 < coloured / len(scenes) < 0.95  # mostly named, sometimes dropped
    assert {f"a photo of a {k}" for k in CLASSES} & set(captions)  # class-only captions occur


def test_each_context_draws_distinguishable_backgrounds():
    """A nearest-centroid classifier on coarse colour layout (4 x 4 cells of mean RGB) tells the
    contexts apart on held-out seeds: the backgrounds differ by context, not by seed."""

    def features(scene) -> np.ndarray:
        a = np.asarray(background(scene), dtype=float)
        return a.reshape(4, 16, 4, 16, 3).mean(axis=(1, 3)).ravel()

    rng = np.random.default_rng(6)
    names = list(CONTEXTS)
    train = {c: np.stack([features(sample_scene(rng, contexts=[c])) for _ in range(8)]) for c in names}
    centroids = np.stack([train[c].mean(axis=0) for c in names])
    right = total = 0
    for i, c in enumerate(names):
        for _ in range(6):
            f = features(sample_scene(rng, contexts=[c]))
            right += int(np.argmin(((centroids - f) ** 2).sum(axis=1)) == i)
            total += 1
    assert right / total >= 0.9  # chance is 1 in 11
    # and no context's backgrounds are all alike: the seed varies them
    assert all(train[c].std(axis=0).mean() > 1.0 for c in names)


@pytest.mark.parametrize("kind", ["robot", "dog"])
def test_mirror_swaps_left_and_right_keypoints(kind):
    for scene in iter_scenes(9, 20, classes=[kind]):
        flipped = replace(scene, placement=replace(scene.placement, mirror=not scene.placement.mirror))
        a, b = scene_pose(scene), scene_pose(flipped)
        assert np.allclose(mirror_pose(a).keypoints, b.keypoints)
        parse_pose(render(flipped)[1], "test")


def test_mirror_follows_openposes_left_and_right():
    """One arm up: unmirrored it is the subject's left (the image's right, facing the camera); mirrored,
    the right arm is up, on the image's left."""
    base = next(iter_scenes(10, 1, classes=["robot"]))
    scene = replace(base, pose="one_up/straight", placement=replace(base.placement, mirror=False, tilt=0.0))
    mirrored = replace(scene, placement=replace(scene.placement, mirror=True))
    i = {n: k for k, n in enumerate(KEYPOINT_NAMES)}
    xy, xy_m = keypoints_xy(scene), keypoints_xy(mirrored)
    assert xy[i["left_wrist"], 1] < xy[i["nose"], 1] < xy[i["right_wrist"], 1]
    assert xy[i["left_wrist"], 0] > xy[i["neck"], 0]
    assert xy_m[i["right_wrist"], 1] < xy_m[i["nose"], 1] < xy_m[i["left_wrist"], 1]
    assert xy_m[i["right_wrist"], 0] < xy_m[i["neck"], 0]
    dog = next(iter_scenes(11, 1, classes=["dog"]))
    for mirror, facing in ((False, 1), (True, -1)):  # nose ahead of the tail base: right, mirrored left
        xy = keypoints_xy(replace(dog, placement=replace(dog.placement, mirror=mirror)))
        assert np.sign(xy[0, 0] - xy[3, 0]) == facing


def test_unknown_names_are_errors_that_list_the_choices():
    with pytest.raises(ValueError, match="teal.*expected one of"):
        Instance("robot", "teal", "round", "star", "normal")
    with pytest.raises(ValueError, match="robot shape 'pointed'"):
        Instance("robot", "red", "pointed", "star", "normal")
    with pytest.raises(ValueError, match=r"\['cat'\].*choose from"):
        sample_scene(np.random.default_rng(0), classes=["cat"])
    with pytest.raises(ValueError, match="unknown context"):
        sample_scene(np.random.default_rng(0), contexts=["moon"])
