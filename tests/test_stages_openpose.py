"""The stages with a pose detector that also reads class images: class (image, pose) pairs reach stage 2.

The stages run in-process in a temporary folder (test profile); controlnet_aux's OpenPose network is
replaced by a stub estimator that finds one full body in every image (its weights need the Hub).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import yaml

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
    monkeypatch.setattr(evaluate, "make_detector", lambda name, e, device: OpenposeDetector("", FullBodyStub()))
    run(sample, monkeypatch)
    run(evaluate, monkeypatch)
    adherence = json.loads((tmp_path / "metrics/evaluate.json").read_text())["pose_adherence"]
    assert adherence["detector"] == "openpose" and adherence["detection_rate"] == 1.0
    assert adherence["n_images"] == 2 * 2 * 2  # prompts x poses x seeds (test profile)
    assert set(adherence["per_pose"]) == {"standing", "arms_up"}
    for key in ("pck_0.1", "pck_0.2", "oks_ap", "mean_oks", "keypoint_cosine"):
        assert 0.0 <= adherence[key] <= 1.0, key
    assert adherence["per_pose"]["standing"]["n_images"] == 4
