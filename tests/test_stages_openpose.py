"""The stages with a pose detector that also reads class images: class (image, pose) pairs reach stage 2.

The stages run in-process in a temporary folder (test profile); controlnet_aux's OpenPose network is
replaced by stub estimators (its weights need the Hub): one that finds one full body in every image, for
extraction, and one that finds the standing target pose in some generated images, for evaluation.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT
from tests.profile import apply_profile


class FullBodyStub:
    """controlnet_aux ``Body`` stand-in: one person, all 18 keypoints, spread over the image."""

    def __call__(self, bgr):
        h, w = bgr.shape[:2]
        xs, ys = np.linspace(0.3, 0.7, 18) * w, np.linspace(0.1, 0.9, 18) * h
        candidate = np.stack([xs, ys, np.full(18, 0.9), np.arange(18)], axis=1)
        subset = np.concatenate([np.arange(18), [16.2, 18]])[None]
        return candidate, subset

    from controlnet_aux.open_pose.body import Body as _Body

    format_body_result = staticmethod(_Body.format_body_result)


STANDING = ROOT / "data" / "target_poses" / "standing.json"


def finds_someone(rgb: np.ndarray) -> bool:
    """StandingStub's rule: it sees a person in images whose pixel values add up to an even number."""
    return int(rgb.astype(np.int64).sum()) % 2 == 0


class StandingStub(FullBodyStub):
    """controlnet_aux ``Body`` stand-in: the standing target pose (512 px canvas) drawn at the image's size
    where ``finds_someone``, nobody elsewhere."""

    def __call__(self, bgr):
        if not finds_someone(bgr):
            return np.zeros((0, 4)), np.zeros((0, 20))
        h, w = bgr.shape[:2]
        kp = np.array(json.loads(STANDING.read_text())["keypoints"])
        candidate = np.stack([kp[:, 0] * w / 512, kp[:, 1] * h / 512, np.full(18, 0.9), np.arange(18)], axis=1)
        subset = np.concatenate([np.arange(18), [16.2, 18]])[None]
        return candidate, subset


def run(module, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__])
    module.main()


def test_class_pose_pairs_flow_into_stage2(tmp_path, monkeypatch):
    from posebooth.detectors import OpenposeDetector
    from stages import extract_poses, generate_class_priors, prepare_images, train_stage1_appearance, train_stage2_pose

    shutil.copytree(ROOT / "data" / "subject", tmp_path / "data" / "subject")
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["extract_poses"]["detector"] = "openpose"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        extract_poses, "make_detector", lambda name, e, device: OpenposeDetector(e.openpose_weights, FullBodyStub())
    )

    for stage in (prepare_images, generate_class_priors, extract_poses):
        run(stage, monkeypatch)
    report = json.loads((tmp_path / "data/poses/report.json").read_text())
    kinds = [(r["kind"], r["used"], r["detector"]) for r in report["images"]]
    assert kinds == [("instance", True, "openpose")] * 6 + [("class", True, "openpose")] * 4
    assert len(list((tmp_path / "data/poses/maps").glob("class_*.png"))) == 4

    run(train_stage1_appearance, monkeypatch)
    run(train_stage2_pose, monkeypatch)
    metrics = json.loads((tmp_path / "metrics/train_stage2_pose.json").read_text())
    assert metrics["pairs"] == 6 and metrics["class_pairs"] == 4 and metrics["prior_loss"] > 0
    prov = json.loads((tmp_path / "models/stage2/provenance.json").read_text())
    assert prov["class_pairs"] == [f"class_{i:04d}" for i in range(4)]
    assert prov["git"]["commit"] == "unknown"  # not a git checkout: said, not invented

    # With a detector that reads generated images, evaluate measures pose adherence, per target pose too.
    from stages import evaluate, sample

    shutil.copytree(ROOT / "data" / "target_poses", tmp_path / "data" / "target_poses")
    (tmp_path / "data" / "loras").mkdir()
    monkeypatch.setattr(evaluate, "make_detector", lambda name, e, device: OpenposeDetector("", StandingStub()))
    run(sample, monkeypatch)
    run(evaluate, monkeypatch)
    adherence = json.loads((tmp_path / "metrics/evaluate.json").read_text())["pose_adherence"]
    per_pose = json.loads((tmp_path / "metrics/evaluate_breakdown.json").read_text())["pose_adherence"]["per_pose"]
    info = json.loads((tmp_path / "metrics/evaluate.info.json").read_text())
    assert info["pose_adherence"]["detector"] == "openpose" and "pose_adherence" not in info["not_measured"]
    assert adherence["n_images"] == 2 * 2 * 2  # prompts x poses x seeds (test profile)
    assert per_pose["standing"]["n_images"] == 4

    # What evaluate must report, image by image: the standing pose scores PCK 1 against its own target;
    # against arms_up, whose elbows and wrists (3, 4, 6, 7) lie 128 px or more from standing's on the 512 px
    # canvas, more than 0.2 x 409.6 (the longer side of arms_up's keypoint box), it hits the other 14 of 18.
    # A missed image scores 0.
    index = json.loads((tmp_path / "samples/index.json").read_text())
    posed = [r for r in index["images"] if r.get("kind", "subject") == "subject" and r["pose"] is not None]
    found = {}
    for r in posed:
        with Image.open(tmp_path / "samples" / r["file"]) as im:
            found[r["file"]] = finds_someone(np.asarray(im.convert("RGB")))
    assert 0 < sum(found.values()) < len(found), found  # the rule tells the images apart
    hit = {"standing": 1.0, "arms_up": 14 / 18}
    for name, rows in [("all", posed)] + [(n, [r for r in posed if r["pose"] == n]) for n in hit]:
        got = adherence if name == "all" else per_pose[name]
        pcks = [hit[r["pose"]] if found[r["file"]] else 0.0 for r in rows]
        assert got["detection_rate"] == pytest.approx(np.mean([found[r["file"]] for r in rows]), abs=1e-6), name
        assert got["pck_0.1"] == pytest.approx(np.mean(pcks), abs=1e-6), name
        assert got["pck_0.2"] == pytest.approx(np.mean(pcks), abs=1e-6), name
    standing_found = [found[r["file"]] for r in posed if r["pose"] == "standing"]
    assert per_pose["standing"]["mean_oks"] == pytest.approx(np.mean(standing_found), abs=1e-6)
