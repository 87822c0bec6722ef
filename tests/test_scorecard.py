"""metrics/evaluate.json: numbers or null only, under the same keys in every configuration; why a figure is null
in the info file. Assembled from hand-made per-image scores, as evaluate does from its models."""

from __future__ import annotations

import json

import pytest

from posebooth import outputs, scorecard
from posebooth.metrics import summarise_pose_scores

PROMPTS = ("a photo of sks robot", "a sks robot on the beach")
CALIBRATION = {"threshold": 0.5, "eer": 0.1, "n_positive": 10, "n_negative": 20}
REAL = {"model": "facebook/dino-vits16", "stand_in": False, "source": "real"}
STAND_IN = {"model": "random-alex", "stand_in": True, "source": "stand-in"}
FID = dict.fromkeys(scorecard.FID_KID, 1.0)
FACE = {"mean": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n": 4, "face_rate": 0.5, "n_reference_faces": 3}


def entries(poses=("a", "b"), pose_free=True, prior=True, baselines=True) -> list[dict]:
    """samples/index.json's images as sample.py writes them, two seeds each."""
    jobs = [(p, None, "subject") for p in PROMPTS] if pose_free else []
    jobs += [(p, q, "subject") for p in PROMPTS for q in poses]
    jobs += [("a photo of a robot", None, "class")] if prior else []
    if baselines:
        jobs += [(p, None, "base") for p in PROMPTS] + ([("a photo of a robot", None, "base_class")] if prior else [])
        jobs += [(p, q, "pretrained_controlnet") for p in PROMPTS for q in poses]
        jobs += [(p, None, "unposed") for p in PROMPTS]
    return [{"kind": k, "prompt": p, "pose": q} for p, q, k in jobs for _ in range(2)]


def adherence(rows: list[int], names: list[str]) -> dict:
    """metrics.pose_adherence's answer for a detector that finds every pose half right."""
    scored = [{"detected": True, "score": 1.0, "pck_0.1": 0.5, "pck_0.2": 0.5, "oks": 0.5, "cosine": 0.9}] * len(rows)
    per_pose = {}
    for n in dict.fromkeys(names):
        per_pose[n] = summarise_pose_scores([s for s, m in zip(scored, names, strict=True) if m == n])
    return {"detector": "stub", **summarise_pose_scores(scored), "per_pose": per_pose}


def assemble(items: list[dict], calibration=CALIBRATION, adherence=adherence, fid=FID, face=FACE, backbone=REAL):
    scores = {k: [0.25 + 0.5 * (i % 2) for i in range(len(items))] for k in ("dino", "clip_i", "clip_t")}
    scores["lpips_to_references"] = [0.3] * len(items)
    scores["context_accuracy"] = [float(i % 2) if "beach" in r["prompt"] else None for i, r in enumerate(items)]
    return scorecard.assemble(
        items,
        scores,
        lambda groups: [0.1 * len(g) for g in groups if len(g) > 1],
        adherence,
        fid,
        face,
        {"clip": REAL, "dino": REAL, "lpips": backbone},
        {"detector": "stub", "source": "real"},
        n_references=3,
        calibration=calibration,
        seed=0,
    )


# The configurations whose metrics used to hold sentences, booleans or fewer keys.
CONFIGURATIONS = {
    "everything measured": lambda: assemble(entries()),
    "sidecar, stand-ins, no baselines, no FID, no faces, no threshold": lambda: assemble(
        entries(baselines=False),
        calibration=None,
        face="not measured: evaluate.face_identity is auto (class 'robot')",
        adherence="the sidecar detector cannot detect poses on generated images",
        fid="not measured: evaluate.fid_model is none",
        backbone=STAND_IN,
    ),
    "no target poses": lambda: assemble(entries(poses=())),
    "posed only, no class images": lambda: assemble(entries(pose_free=False, prior=False)),
}


def subtree(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data[key]
    return data


def test_every_configuration_has_the_same_numeric_columns():
    assembled = {name: make() for name, make in CONFIGURATIONS.items()}
    columns = {name: outputs.flatten(metrics) for name, (metrics, _, _) in assembled.items()}
    every = set(outputs.flatten(scorecard.template()))
    for name, (metrics, _, info) in assembled.items():
        outputs.check_metrics(metrics, name)  # raises on a string or a boolean
        assert set(columns[name]) == every, (name, every ^ set(columns[name]))
        for dotted, why in info["not_measured"].items():  # every reason stands for nulls only
            assert why and set(outputs.flatten({"x": subtree(metrics, dotted)}).values()) == {None}, (name, dotted)
        json.dumps(info)
    full, everything = columns["everything measured"], assembled["everything measured"]
    assert everything[2]["not_measured"] == {}
    assert full["pose_adherence.pck_0.2"] == 0.5 and full["unposed_against_targets.n_images"] == 2 * 2 * 2
    assert full["pretrained_controlnet.pose_adherence.n_images"] == 8 and full["base_model.pres.n"] == 2
    assert full["verified.mean"] == 0.5 and full["stand_in"] == 0  # half the DINO scores pass 0.5
    assert everything[1]["pose_adherence"]["per_pose"]["a"]["n_images"] == 4  # per pose: in the breakdown
    sidecar, _, info = assembled["sidecar, stand-ins, no baselines, no FID, no faces, no threshold"]
    assert sidecar["stand_in"] == 1 and sidecar["pose_adherence"]["pck_0.2"] is None
    assert info["not_measured"]["pose_adherence"] == "the sidecar detector cannot detect poses on generated images"
    assert info["not_measured"]["face_identity"] == "evaluate.face_identity is auto (class 'robot')"
    assert {"base_model", "pretrained_controlnet", "fid_kid", "verification_threshold"} <= set(info["not_measured"])
    assert info["backbones"]["lpips"]["source"] == "stand-in" and info["pose_adherence"]["detector"] == "stub"
    none = assembled["no target poses"]
    assert none[0]["posed"]["n_images"] is None and none[2]["not_measured"]["posed"].startswith("no posed samples")


def test_a_metric_missing_from_the_template_or_a_sentence_in_place_of_a_number_is_refused():
    metrics, _, _ = assemble(entries())
    with pytest.raises(ValueError, match=r"\['pose_adherence.detector'\] missing from scorecard.template"):
        scorecard.fill(
            metrics | {"pose_adherence": metrics["pose_adherence"] | {"detector": "world"}}, scorecard.template()
        )
    with pytest.raises(ValueError, match="stand_in is True"):
        scorecard.fill(metrics | {"stand_in": True}, scorecard.template())
    with pytest.raises(ValueError, match="pres is neither measured nor said why not"):
        scorecard.fill({k: v for k, v in metrics.items() if k != "pres"}, scorecard.template())


def test_write_metrics_takes_numbers_and_null_only(tmp_path):
    path = tmp_path / "m.json"
    outputs.write_metrics(path, {"loss": 0.5, "steps": 3, "ci": {"low": None}})
    assert json.loads(path.read_text()) == {"loss": 0.5, "steps": 3, "ci": {"low": None}}
    for bad in ({"method": "lora"}, {"x": {"stand_in": True}}, {"per_pose": [1, 2]}):
        with pytest.raises(ValueError, match="metrics must be numbers or null"):
            outputs.write_metrics(path, bad)
    assert json.loads(path.read_text())["loss"] == 0.5  # the refused writes left the file as it was


def test_the_stand_in_warning_names_only_the_figures_stand_ins_make():
    """The world default scores DINO and CLIP with the world's models but LPIPS and FID with stand-ins: the warning
    names those two (not every number), and says nothing when no backbone is a stand-in."""
    from posebooth.scorecard import stand_in_note

    def backbone(model, stand_in):
        return {"model": model, "stand_in": stand_in, "source": "stand-in" if stand_in else "world"}

    world = {"clip": backbone("embedded:world-clip", False), "dino": backbone("embedded:world-dino", False),
             "lpips": backbone("random-alex", True), "fid": backbone("embedded:tiny-inception", True)}  # fmt: skip
    note = stand_in_note(world)
    assert "LPIPS, DIV (random-alex)" in note and "FID, KID (embedded:tiny-inception)" in note
    assert "DINO" not in note and "CLIP" not in note
    assert stand_in_note({k: b | {"stand_in": False} for k, b in world.items()}) is None
