"""What `evaluate` writes, assembled from per-image scores: the metrics, their breakdown and the info beside them.

`dvc exp show` makes a column of each flattened metrics key (``pose_adherence.pck_0.2``) and `dvc metrics diff`
compares them, so metrics/evaluate.json holds only numbers or null, under the same keys in every configuration
(``template``): what a configuration cannot measure (no posed samples, no baselines, the sidecar detector, no FID
model, a class without faces) is null there, and why goes to ``not_measured`` in the info file
(metrics/evaluate.info.json, a plain output), with the backbones and pose detector that measured the rest
(``backbones.clip.source``, ``pose_adherence.detector``). Per-prompt and per-pose figures, whose keys depend on
the prompts and poses, go to the breakdown (evaluate_breakdown.json), at their figure's key plus ``per_pose``.
"""

from __future__ import annotations

from collections.abc import Callable

from posebooth import outputs, stats
from posebooth.metrics import summarise_pose_scores

SUMMARY = tuple(stats.summary([]))  # mean, its 95 % bootstrap interval (ci_low, ci_high), n
SCORES = ("dino", "clip_i", "clip_t", "lpips_to_references", "verified", "context_accuracy", "lpips_diversity")
POSE_ADHERENCE = tuple(summarise_pose_scores([]))  # detection rate, PCK@0.1/0.2, mean OKS, cosine, OKS AP, n_images
FID_KID = (
    "fid",
    "fid_ci_low",
    "fid_ci_high",
    "kid",
    "kid_std",
    "kid_ci_low",
    "kid_ci_high",
    "kid_subset_size",
    "n_generated",
    "n_references",
)  # fidelity.fid_kid
FACE_IDENTITY = (*SUMMARY, "face_rate", "n_reference_faces")  # faceid.face_similarity
THRESHOLD = ("threshold", "eer", "n_positive", "n_negative")  # the DINO model's verification.json

NO_POSED = "no posed samples (sample.poses is empty)"
NO_FREE = "no pose-free samples (sample.pose_free is false)"
NO_PRIOR = "sample.prior_images is false (no class-prompt images to compare)"
NO_BASELINES = "sample.baselines is false"
NO_THRESHOLD = "the DINO model carries no verification.json (a same-instance threshold): `verified` is null too"


def template() -> dict:
    """Every key of metrics/evaluate.json, each None."""
    summary, pose = dict.fromkeys(SUMMARY), dict.fromkeys(POSE_ADHERENCE)

    def scores(**more) -> dict:
        return {k: dict(summary) for k in SCORES} | {"n_images": None} | more

    return {
        **scores(n_references=None),
        "posed": scores(),
        "pose_free": scores(),
        "pres": dict(summary),
        "pres_verification": dict(summary),
        "verification_threshold": dict.fromkeys(THRESHOLD),
        "base_model": scores(pres=dict(summary), pres_verification=dict(summary)),
        "pretrained_controlnet": scores(pose_adherence=dict(pose)),
        "fid_kid": dict.fromkeys(FID_KID),
        "face_identity": dict.fromkeys(FACE_IDENTITY),
        "stand_in": None,  # 1 when a backbone is a stand-in (random weights that measure nothing)
        "pose_adherence": dict(pose),
        "unposed_against_targets": dict(pose),
    }


def _nulls(shape: dict) -> dict:
    return {k: _nulls(v) if isinstance(v, dict) else None for k, v in shape.items()}


def fill(measured: dict, shape: dict, where: str = "") -> tuple[dict, dict[str, str]]:
    """``shape`` (``template()``) with the figures of ``measured``: a number stays; a group given as a sentence
    (why it was not measured) becomes nulls, and the sentence is returned by its dotted key. A key that
    ``shape`` lacks, a group left out or a leaf that is not a number raises: every experiment must have every
    column, and every null its reason."""
    unknown = [where + k for k in measured if k not in shape]
    if unknown:
        raise ValueError(f"evaluate: {unknown} missing from scorecard.template(); add them there")
    out, why = {}, {}
    for key, slot in shape.items():
        name, value = where + key, measured.get(key)
        if key not in measured:
            raise ValueError(f"evaluate: {name} is neither measured nor said why not")
        if isinstance(slot, dict) and isinstance(value, str):
            out[key], why[name] = _nulls(slot), value.removeprefix("not measured: ")
        elif isinstance(slot, dict) and isinstance(value, dict):
            out[key], more = fill(value, slot, name + ".")
            why |= more
        elif not isinstance(slot, dict) and outputs.is_metric_value(value):
            out[key] = value
        else:
            raise ValueError(f"evaluate: {name} is {value!r}, where the template has {slot!r}")
    return out, why


def assemble(
    entries: list[dict],
    per_image: dict[str, list],
    diversity: Callable[[list[list[int]]], list[float]],
    adherence: Callable[[list[int], list[str]], dict] | str,
    fid_kid: dict | str,
    face_identity: dict | str,
    backbones: dict[str, dict],
    pose_detector: dict[str, str],
    n_references: int,
    calibration: dict | None,
    seed: int,
) -> tuple[dict, dict, dict]:
    """``(metrics, breakdown, info)`` of evaluate.

    ``entries``: samples/index.json's images (``kind``, ``prompt``, ``pose``); ``per_image``: each score
    (dino, clip_i, clip_t, lpips_to_references, context_accuracy) with one value per entry, None where it does
    not apply; ``diversity``: groups of entry indices -> the LPIPS of every pair within a group (DIV);
    ``adherence``: (entry indices, the target pose of each) -> ``metrics.pose_adherence``, or why pose adherence
    cannot be measured; ``fid_kid``, ``face_identity``: their figures or why not; ``backbones``: model, stand_in,
    source per backbone; ``pose_detector``: detector and source; ``calibration``: the DINO model's
    verification.json (None without one)."""
    per_image = dict(per_image)
    threshold = calibration["threshold"] if calibration is not None else None
    per_image["verified"] = [None if threshold is None else float(d >= threshold) for d in per_image["dino"]]
    kind = {
        k: [i for i, r in enumerate(entries) if r.get("kind", "subject") == k]
        for k in ("subject", "class", "base", "base_class", "pretrained_controlnet", "unposed")
    }

    def summary(key: str, rows: list[int]) -> dict:
        return stats.summary([per_image[key][i] for i in rows], seed=seed)

    def scores(rows: list[int]) -> dict:
        """Every score over the entries ``rows``: mean, 95 % bootstrap interval, n."""
        groups: dict[tuple, list[int]] = {}
        for i in rows:
            groups.setdefault((entries[i]["prompt"], entries[i]["pose"]), []).append(i)
        out = {k: summary(k, rows) for k in per_image}
        out["lpips_diversity"] = stats.summary(diversity(list(groups.values())), seed=seed)  # DIV; n counts pairs
        out["n_images"] = len(rows)
        return out

    def drift(rows: list[int]) -> dict:
        """PRES over the class-prompt images ``rows`` (DINO to the subject's photos), and the verification rate."""
        if not rows:
            return {"pres": NO_PRIOR, "pres_verification": NO_PRIOR}
        return {
            "pres": summary("dino", rows),
            "pres_verification": summary("verified", rows) if threshold is not None else NO_THRESHOLD,
        }

    subject = kind["subject"]
    posed = [i for i in subject if entries[i]["pose"] is not None]
    free = [i for i in subject if entries[i]["pose"] is None]
    result = scores(subject) | {"n_references": n_references}
    result |= {"posed": scores(posed) if posed else NO_POSED, "pose_free": scores(free) if free else NO_FREE}
    result |= drift(kind["class"])
    result["verification_threshold"] = {k: calibration[k] for k in THRESHOLD} if calibration else NO_THRESHOLD
    result["base_model"] = scores(kind["base"]) | drift(kind["base_class"]) if kind["base"] else NO_BASELINES
    pretrained = kind["pretrained_controlnet"]
    result["pretrained_controlnet"] = scores(pretrained) if pretrained else NO_POSED if kind["base"] else NO_BASELINES
    result["fid_kid"], result["face_identity"] = fid_kid, face_identity
    result["stand_in"] = int(any(b["stand_in"] for b in backbones.values()))
    breakdown = {
        "per_prompt": {
            p: scores([i for i in subject if entries[i]["prompt"] == p])
            for p in dict.fromkeys(entries[i]["prompt"] for i in subject)
        },
        "per_pose": {
            str(q): scores([i for i in subject if entries[i]["pose"] == q])
            for q in dict.fromkeys(entries[i]["pose"] for i in subject)
        },
    }

    def detect(rows: list[int], targets: list[str]) -> tuple[dict, dict]:
        """Pose adherence of the entries ``rows`` to ``targets``: the figures, and the breakdown per target pose."""
        found = dict(adherence(rows, targets))
        found.pop("detector", None)  # named in the info file
        return found, {"per_pose": found.pop("per_pose")}

    if isinstance(adherence, str) or not posed:
        why = adherence if isinstance(adherence, str) else NO_POSED
        result["pose_adherence"] = why
        result["unposed_against_targets"] = why
        if pretrained:
            result["pretrained_controlnet"]["pose_adherence"] = why
    else:
        result["pose_adherence"], breakdown["pose_adherence"] = detect(posed, [entries[i]["pose"] for i in posed])
        if pretrained:  # the same prompts, poses and seeds before stage 2
            found, per_pose = detect(pretrained, [entries[i]["pose"] for i in pretrained])
            result["pretrained_controlnet"]["pose_adherence"] = found
            breakdown["pretrained_controlnet"] = {"pose_adherence": per_pose}
        if kind["unposed"]:  # chance: each pose-free image of a posed prompt against every target pose
            names = list(dict.fromkeys(entries[i]["pose"] for i in posed))
            rows = [(i, n) for i in kind["unposed"] for n in names]
            result["unposed_against_targets"], breakdown["unposed_against_targets"] = detect(
                [i for i, _ in rows], [n for _, n in rows]
            )
        else:
            result["unposed_against_targets"] = NO_BASELINES
    metrics, not_measured = fill(result, template())
    info = {"backbones": backbones, "pose_adherence": pose_detector, "not_measured": not_measured}
    return metrics, breakdown, info


# The figures each backbone's embeddings make (backbones' keys as in evaluate.info.json).
BACKBONE_FIGURES = {"clip": "CLIP-I, CLIP-T, context accuracy", "dino": "DINO, PRES, verification",
                    "lpips": "LPIPS, DIV", "fid": "FID, KID"}  # fmt: skip


def stand_in_note(backbones: dict) -> str | None:
    """Which figures come from stand-in backbones (random weights that measure nothing), or None when none do."""
    weak = {name: b for name, b in backbones.items() if b["stand_in"]}
    if not weak:
        return None
    named = "; ".join(f"{BACKBONE_FIGURES.get(name, name)} ({b['model']})" for name, b in weak.items())
    return f"stand-in backbones: {named} test the pipeline and measure nothing"
