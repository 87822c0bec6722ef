"""Metric functions against hand computation."""

from __future__ import annotations

import numpy as np
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
    hit = pose_adherence(_FixedDetector(exact), images, [target] * 3, ["a", "a", "b"])
    assert {k: hit[k] for k in ("detector", "pck_0.1", "pck_0.2", "detection_rate", "oks_ap", "mean_oks",
                                "keypoint_cosine", "n_images")} == {
        "detector": "fixed", "pck_0.1": 1.0, "pck_0.2": 1.0, "detection_rate": 1.0, "oks_ap": 1.0, "mean_oks": 1.0,
        "keypoint_cosine": 1.0, "n_images": 3}  # fmt: skip
    assert hit["per_pose"]["a"]["n_images"] == 2 and hit["per_pose"]["b"]["n_images"] == 1
    assert hit["pck_0.2_ci_low"] == hit["pck_0.2_ci_high"] == 1.0  # every image scored 1: no spread
    miss = pose_adherence(_FixedDetector(None), images, [target] * 3)
    assert miss["pck_0.2"] == 0.0 and miss["detection_rate"] == 0.0 and miss["oks_ap"] == 0.0
    assert miss["keypoint_cosine"] is None  # no detection: nothing to compare, said by the detection rate


# Pose metrics on hand-placed keypoints (OpenPose-18 order: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm ...).
BODY = {0: (250, 100), 1: (250, 150), 2: (200, 150), 3: (180, 220), 4: (170, 290), 5: (300, 150),
        6: (320, 220), 7: (330, 290), 8: (220, 300), 9: (215, 400), 11: (280, 300), 12: (285, 400)}  # fmt: skip


def test_identical_poses_score_one_everywhere():
    from posebooth.metrics import keypoint_cosine, oks, pck
    from posebooth.poses import COCO_SIGMAS

    kp = _kp(BODY)
    assert pck(kp, kp, 0.1) == 1.0 and pck(kp, kp, 0.2) == 1.0
    assert oks(kp, kp, COCO_SIGMAS) == 1.0 and keypoint_cosine(kp, kp) == pytest.approx(1.0)


def test_translation_and_scale_cosine_is_invariant_pck_and_oks_are_not():
    from posebooth.metrics import keypoint_cosine, oks, pck
    from posebooth.poses import COCO_SIGMAS

    kp = _kp(BODY)
    moved = kp.copy()
    moved[:, :2] = (kp[:, :2] - 250) * 0.5 + 400  # half the size, elsewhere on the canvas
    moved[kp[:, 2] == 0] = 0
    assert keypoint_cosine(moved, kp) == pytest.approx(1.0)  # the same pose, as defined: shape only
    assert pck(moved, kp, 0.2) < 0.5 and oks(moved, kp, COCO_SIGMAS) < 0.1  # placement matters to these
    nudged = kp.copy()
    nudged[kp[:, 2] > 0, 0] += 20  # 20 px to the right; the target's box is 300 px: 0.067 of it
    assert pck(nudged, kp, 0.1) == 1.0 and pck(nudged, kp, 0.05) == 0.0


def test_missing_keypoints_count_against_pck_and_oks_and_are_skipped_by_cosine():
    from posebooth.metrics import keypoint_cosine, oks, pck
    from posebooth.poses import COCO_SIGMAS

    kp = _kp(BODY)
    partial = kp.copy()
    partial[[3, 4, 6, 7]] = 0  # no elbows or wrists found: 4 of the 12 visible keypoints
    assert pck(partial, kp, 0.2) == pytest.approx(8 / 12)
    assert oks(partial, kp, COCO_SIGMAS) == pytest.approx(8 / 12)
    assert keypoint_cosine(partial, kp) == pytest.approx(1.0)  # over the keypoints both have
    assert pck(kp, partial, 0.2) == 1.0  # extra keypoints in the prediction cost nothing


def test_a_left_right_swap_is_caught():
    from posebooth.metrics import keypoint_cosine, oks, pck
    from posebooth.poses import COCO_SIGMAS, Pose, mirror_pose

    kp = _kp(BODY)
    swapped = kp.copy()
    for r, left in ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12)):
        swapped[[r, left]] = swapped[[left, r]]
    assert pck(swapped, kp, 0.2) < 0.7 and oks(swapped, kp, COCO_SIGMAS) < 0.7 and keypoint_cosine(swapped, kp) < 0.9
    # Mirroring the image and swapping the sides gives the anatomically same pose back: x -> W - x.
    mirrored = mirror_pose(Pose(500, 500, kp)).keypoints
    back = mirror_pose(Pose(500, 500, mirrored)).keypoints
    assert np.allclose(back, kp)
    assert mirrored[2, 0] == pytest.approx(500 - kp[5, 0])  # right shoulder now where the left one mirrored is


def test_an_empty_detection():
    from posebooth.metrics import keypoint_cosine, oks, oks_ap, pck, pose_scores, summarise_pose_scores
    from posebooth.poses import COCO_SIGMAS

    kp = _kp(BODY)
    assert pck(None, kp, 0.2) == 0.0 and oks(None, kp, COCO_SIGMAS) == 0.0 and keypoint_cosine(None, kp) is None
    assert oks_ap([]) is None and oks_ap([(0.0, 0.0)] * 3) == 0.0
    rows = [pose_scores(None, kp, COCO_SIGMAS)] * 2
    summary = summarise_pose_scores(rows)
    assert summary["detection_rate"] == 0.0 and summary["pck_0.2"] == 0.0 and summary["n_images"] == 2


def test_oks_ap_by_hand():
    from posebooth.metrics import oks_ap

    # Two images: one found with OKS 0.9 (score 0.8), one missed: recall tops out at 0.5 at every threshold
    # up to 0.9 with precision 1, so AP = 0.5 x (51/101) for thresholds 0.5-0.9 and 0 at 0.95.
    ap = oks_ap([(0.8, 0.9), (0.0, 0.0)])
    assert ap == pytest.approx((9 * 51 / 101 + 0) / 10)
    assert oks_ap([(0.9, 1.0), (0.5, 1.0)]) == pytest.approx(1.0)
    # A confident bad detection ranked first lowers precision: below the same set ranked the other way.
    assert oks_ap([(0.9, 0.1), (0.5, 1.0)]) < oks_ap([(0.9, 1.0), (0.5, 0.1)])


def test_per_image_scores_average_to_the_paper_metrics():
    from posebooth.metrics import matched_cosine, per_image_cosine

    g = torch.Generator().manual_seed(0)
    gen, ref, txt = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    assert per_image_cosine(gen, ref).mean().item() == pytest.approx(mean_pairwise_cosine(gen, ref))
    assert matched_cosine(gen, txt).mean().item() == pytest.approx(mean_matched_cosine(gen, txt))
    same = torch.randn(4, 8, generator=g)
    assert torch.allclose(per_image_cosine(same[:1].expand(3, -1), same[:1]), torch.ones(3))  # identical: 1


def test_identical_images_give_lpips_zero_and_pairs_are_counted():
    from posebooth.metrics import lpips_to_references, pairwise_lpips

    lpips = lpips_distance("random-alex")
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert lpips_to_references(image, image.expand(2, -1, -1, -1), lpips) == [pytest.approx(0.0, abs=1e-6)]
    groups = [torch.cat([image, image, image]), torch.rand(2, 3, 32, 32) * 2 - 1]
    pairs = pairwise_lpips(groups, lpips)
    assert len(pairs) == 3 + 1 and pairs[:3] == [pytest.approx(0.0, abs=1e-6)] * 3 and pairs[3] > 0


def _images(n, seed, high=255):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, high, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_fid_of_a_set_with_itself_is_zero_and_kid_works_below_the_default_subset():
    from posebooth import fidelity

    name = fidelity.register(fidelity.TINY)
    a, b = _images(8, 0), _images(5, 1, high=120)
    same = fidelity.fid_kid(a, a, name)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-2
    other = fidelity.fid_kid(a, b, name)  # 5 images: far under torch-fidelity's default subset of 1000
    assert other["fid"] > 1.0 and other["kid"] > same["kid"]
    assert other["kid_subset_size"] == 5 and (other["n_generated"], other["n_references"]) == (8, 5)
    assert other["fid_ci_low"] <= other["fid"] <= other["fid_ci_high"] and other["kid_ci_low"] <= other["kid_ci_high"]


def test_inception_weights_load_safely(tmp_path):
    """The real InceptionV3 extractor, with random weights written here: loaded from .safetensors or from a
    .pth with weights_only=True; a pickle that would run code is refused."""
    import pickle

    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from posebooth import fidelity

    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # build it without weights
    try:
        with fidelity._loaded_state({}):
            random_net = FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path="none")
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    state = {k: v.contiguous() for k, v in random_net.state_dict().items()}
    save_file(state, str(tmp_path / "inception.safetensors"))
    torch.save(state, tmp_path / "inception.pth")
    for path in (tmp_path / "inception.safetensors", tmp_path / "inception.pth"):
        loaded = fidelity.load_inception_state(str(path))
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    net = fidelity._safe_inception_class(str(tmp_path / "inception.safetensors"))("y", ["2048"])
    assert torch.equal(net.state_dict()["fc.weight"], state["fc.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc.weight": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        fidelity.load_inception_state(str(tmp_path / "evil.pth"))
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        fidelity.load_inception_state(str(tmp_path / "missing.pth"))


def test_inception_offline_fails_at_once_naming_the_file(monkeypatch, tmp_path, refused_connections):
    from posebooth import fidelity

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(OSError, match=r"InceptionV3 weights .* download https://github.com/toshas/torch-fidelity"):
        fidelity.load_inception_state("")
    assert refused_connections == []  # offline (the session's flag): no download tried
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # without it, when github.com does not answer: the probe, nothing more
    from posebooth import hub

    hub.reachable.cache_clear()
    with pytest.raises(OSError, match=r"InceptionV3 weights .* github.com cannot be reached"):
        fidelity.load_inception_state("")
    assert [port for _, port in refused_connections] == [443]
    hub.reachable.cache_clear()


def test_face_identity_with_an_injected_embedder():
    """A real face (scikit-image's astronaut) against itself scores 1; a robot reference has no face; the
    FaceNet model is optional and says why it is missing."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from posebooth import faceid

    face = Image.fromarray(skimage_data.astronaut()).resize((256, 256))
    from tests.conftest import ROOT

    robot = Image.open(ROOT / "data/subject/robot_01.jpg").convert("RGB")
    g = torch.Generator().manual_seed(0)
    projection = torch.randn(3 * 8 * 8, 16, generator=g)

    def embed(crops):  # a fixed random projection of 8 x 8 thumbnails: identical faces, identical embeddings
        x = torch.stack([torch.from_numpy(np.asarray(c.resize((8, 8)), dtype=np.float32)).flatten() for c in crops])
        return x @ projection

    same = faceid.face_similarity([face, face, robot.resize((256, 256))], [face], embed)
    assert same["mean"] == pytest.approx(1.0, abs=1e-5) and same["n"] == 2 and same["face_rate"] == pytest.approx(2 / 3)
    assert faceid.face_similarity([face], [robot], embed) == "not measured: no face found in the reference photos"
    assert faceid.is_person("Woman") and not faceid.is_person("robot")
    try:
        faceid.FacenetEmbedder()
    except OSError as err:  # not installed here, or its weights are not on this machine: a reason, no crash
        assert "facenet-pytorch" in str(err) or "FaceNet weights" in str(err)


def test_zero_shot_picks_the_nearest_candidate_text():
    """1.0 where the nearest candidate (by cosine, not dot product) is the truth, 0.0 elsewhere, None unchecked."""
    from posebooth.metrics import zero_shot_correct

    images = torch.tensor([[1.0, 0.1], [0.9, 1.0], [0.0, 1.0], [0.0, 1.0]])
    candidates = torch.tensor([[10.0, 0.0], [0.0, 1.0]])  # the first is long: a dot product would pick it for row 1
    assert zero_shot_correct(images, candidates, [0, 1, 0, None]) == [1.0, 1.0, 0.0, None]


def test_measuring_models_say_where_their_numbers_come_from():
    from posebooth.backbones import source

    assert source("embedded:world-dino") == source("embedded:world-clip") == "world"
    assert not is_stand_in("embedded:world-dino")
    assert source("embedded:tiny-dino") == source("random-alex") == "stand-in"
    assert source("facebook/dino-vits16") == "real"
