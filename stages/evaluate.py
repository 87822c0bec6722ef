"""evaluate: the DreamBooth paper's DINO, CLIP-I, CLIP-T, PRES and DIV, LPIPS, and pose adherence.

Reads:  params common.identifier, common.seed, common.device, evaluate.*, the extract_poses detector's
        settings; samples/ (index.json, images, poses/*.json target keypoints), data/prepared.
Writes: metrics/evaluate.json (cache: false, committed, so `dvc metrics diff` compares experiments):
        each metric as mean, 95 % bootstrap interval (ci_low, ci_high) and n, overall, posed, pose-free;
        metrics/evaluate_breakdown.json: the same per prompt and per target pose.
DINO and CLIP-I compare every generated image with every prepared reference photo; CLIP-T compares each
image with its prompt, the identifier removed (the paper's text fidelity). Pose adherence: the pose is
detected again on each posed sample with the extract_poses detector and compared with its target
(detection rate, PCK@0.1 and @0.2, OKS AP, keypoint cosine; overall and per target pose); the sidecar
detector cannot read generated images, so it is then "not measured", with why.
PRES (language drift, the paper's prior preservation): DINO of the trained model's class-prompt images
(sample.prior_images) to the subject's photos; lower is better. DIV: LPIPS between images of one prompt
and pose. Every number states how many images it rests on and where its backbone comes from ("real",
"world": the procedural world's measuring models, or "stand-in": random weights that measure nothing).
Subject verification: the fraction of images whose DINO score passes the same-instance threshold that the
DINO model's folder carries (verification.json, calibrated on held-out instances: the world's DINO has one);
not measured for a DINO without it. Context accuracy: CLIP zero-shot, among DreamBench's contexts, picks the
context the prompt names (for images whose prompt names one). With sample.baselines: the same figures for
the base model (no subject), the ControlNet before stage 2, and pose-free images scored against the targets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image

from posebooth import config, data, faceid, fidelity, outputs, stats
from posebooth.backbones import ClipEmbedder, DinoEmbedder, is_stand_in, lpips_distance, source
from posebooth.detectors import make_detector
from posebooth.images import to_tensor
from posebooth.metrics import (
    lpips_to_references,
    matched_cosine,
    pairwise_lpips,
    per_image_cosine,
    pose_adherence,
    zero_shot_correct,
)  # fmt: skip
from posebooth.poses import load_pose
from posebooth.world.judges import context_of, context_prompts

log = logging.getLogger("evaluate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", default="samples")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--metrics", default="metrics/evaluate.json")
    ap.add_argument("--breakdown", default="metrics/evaluate_breakdown.json")
    ap.add_argument("--plot", default="plots/evaluate_metrics.json")
    args = ap.parse_args()
    outputs.claim("evaluate", args.metrics, args.breakdown, args.plot)
    cfg = config.load(["common", "evaluate", "extract_poses"])
    c, e = cfg.common, cfg.evaluate
    outputs.seed_everything(c.seed, c.deterministic)

    index = outputs.read_json(Path(args.samples) / "index.json")
    entries = index["images"]
    generated = [Image.open(Path(args.samples) / r["file"]).convert("RGB") for r in entries]
    _, ref_pixels = data.instance_images(args.prepared, index["resolution"])
    references = [Image.fromarray(((p.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for p in ref_pixels]
    texts = [" ".join(w for w in r["prompt"].split() if w != c.identifier) for r in entries]

    clip, dino = ClipEmbedder(e.clip_model, c.device), DinoEmbedder(e.dino_model, c.device)
    clip_ref, dino_ref = clip.images(references), dino.images(references)
    subject = [i for i, r in enumerate(entries) if r.get("kind", "subject") == "subject"]
    prior = [i for i, r in enumerate(entries) if r.get("kind") == "class"]
    # Per generated image: DINO and CLIP-I (mean cosine to the reference photos), CLIP-T (with its prompt),
    # LPIPS to the references; per pair of images of one prompt and pose: LPIPS (DIV).
    dino_gen, clip_gen = dino.images(generated), clip.images(generated)
    per_image = {
        "dino": per_image_cosine(dino_gen, dino_ref).tolist(),
        "clip_i": per_image_cosine(clip_gen, clip_ref).tolist(),
        "clip_t": matched_cosine(clip_gen, clip.texts(texts)).tolist(),
    }
    lpips = lpips_distance(e.lpips_net, c.device)
    pixels = [to_tensor(im).to(c.device) for im in generated]
    per_image["lpips_to_references"] = lpips_to_references(torch.stack(pixels), ref_pixels.to(c.device), lpips)
    calibration = dino.calibration  # the same-instance threshold, where the DINO model carries one
    if calibration is not None:
        per_image["verified"] = [float(d >= calibration["threshold"]) for d in per_image["dino"]]
    # Context accuracy: which of DreamBench's contexts CLIP reads in the image, against the one its prompt names.
    contexts = context_prompts(c.class_noun)  # {context: text}
    named = [context_of(r["prompt"]) for r in entries]
    picked = zero_shot_correct(
        clip_gen, clip.texts(list(contexts.values())), [list(contexts).index(n) if n else None for n in named]
    )
    per_image["context_accuracy"] = picked

    def scores(rows: list[int]) -> dict:
        """Every metric over the generated images ``rows``: mean, 95 % bootstrap interval, n."""
        groups: dict[tuple, list[int]] = {}
        for i in rows:
            groups.setdefault((entries[i]["prompt"], entries[i]["pose"]), []).append(i)
        out = {k: stats.summary([v[i] for i in rows], seed=c.seed) for k, v in per_image.items()}
        pairs = pairwise_lpips([torch.stack([pixels[i] for i in g]) for g in groups.values()], lpips)
        out["lpips_diversity"] = stats.summary(pairs, seed=c.seed)  # DIV; n counts pairs
        out["n_images"] = len(rows)
        return out

    result = scores(subject)
    result["n_references"] = len(references)
    posed = [i for i in subject if entries[i]["pose"] is not None]
    free = [i for i in subject if entries[i]["pose"] is None]
    if posed:
        result["posed"] = scores(posed)
    if free:
        result["pose_free"] = scores(free)
    # PRES (language drift): images of the class prompt from the trained model, compared with the subject.
    result["pres"] = (
        stats.summary([per_image["dino"][i] for i in prior], seed=c.seed) if prior
        else "not measured: sample.prior_images is false (no class-prompt images to compare)"
    )  # fmt: skip
    if calibration is not None:  # the same-instance test on the class-prompt images: drift as a rate
        result["pres_verification"] = stats.summary([per_image["verified"][i] for i in prior], seed=c.seed)
        result["verification_threshold"] = {k: calibration[k] for k in ("threshold", "eer", "n_positive", "n_negative")}
    kind = {k: [i for i, r in enumerate(entries) if r.get("kind") == k]
            for k in ("base", "base_class", "pretrained_controlnet", "unposed")}  # fmt: skip
    if kind["base"]:  # sample.baselines: the base model without the subject, for the same prompts
        result["base_model"] = scores(kind["base"])
    if kind["base_class"]:
        result["base_model"]["pres"] = stats.summary([per_image["dino"][i] for i in kind["base_class"]], seed=c.seed)
        if calibration is not None:
            result["base_model"]["pres_verification"] = stats.summary(
                [per_image["verified"][i] for i in kind["base_class"]], seed=c.seed
            )
    if kind["pretrained_controlnet"]:
        result["pretrained_controlnet"] = scores(kind["pretrained_controlnet"])
    breakdown = {
        "per_prompt": {p: scores([i for i in subject if entries[i]["prompt"] == p])
                       for p in dict.fromkeys(entries[i]["prompt"] for i in subject)},
        "per_pose": {str(q): scores([i for i in subject if entries[i]["pose"] == q])
                     for q in dict.fromkeys(entries[i]["pose"] for i in subject)},
    }  # fmt: skip
    if e.fid_model == "none":
        result["fid_kid"] = "not measured: evaluate.fid_model is none"
    else:  # the subject's images against the reference photos; KID's subset fits the smaller set
        extractor = fidelity.register(e.fid_model, e.inception_weights)
        result["fid_kid"] = fidelity.fid_kid([generated[i] for i in subject], references, extractor, c.seed)
    if e.face_identity == "off" or (e.face_identity == "auto" and not faceid.is_person(c.class_noun)):
        result["face_identity"] = f"not measured: evaluate.face_identity is {e.face_identity} (class {c.class_noun!r})"
    else:
        try:
            embed = faceid.FacenetEmbedder(e.face_weights, c.device)
        except OSError as err:  # optional: the rest of the evaluation goes on without it
            result["face_identity"] = f"not measured: {err}"
        else:
            result["face_identity"] = faceid.face_similarity([generated[i] for i in subject], references, embed, c.seed)
    result["backbones"] = {
        "clip": {"model": e.clip_model, "stand_in": is_stand_in(e.clip_model), "source": source(e.clip_model)},
        "dino": {"model": e.dino_model, "stand_in": is_stand_in(e.dino_model), "source": source(e.dino_model)},
        "lpips": {"model": e.lpips_net, "stand_in": is_stand_in(e.lpips_net), "source": source(e.lpips_net)},
        "fid": {"model": e.fid_model, "stand_in": e.fid_model == fidelity.TINY,
                "source": "stand-in" if e.fid_model == fidelity.TINY else "real"},
    }  # fmt: skip
    result["stand_in"] = any(b.get("stand_in", False) for b in result["backbones"].values())
    ep = cfg.extract_poses
    posed = [i for i in subject if entries[i]["pose"] is not None]
    if not posed:
        result["pose_adherence"] = "not measured: no posed samples"
    elif ep.detector == "sidecar":  # sidecar keypoints exist only for the training photos
        result["pose_adherence"] = "not measured: the sidecar detector cannot detect poses on generated images"
    else:
        detector = make_detector(ep.detector, ep, c.device)

        def adherence(rows: list[int]) -> dict:
            targets = [load_pose(Path(args.samples) / entries[i]["pose_keypoints"]) for i in rows]
            return pose_adherence(detector, [generated[i] for i in rows], targets, [entries[i]["pose"] for i in rows])

        result["pose_adherence"] = adherence(posed)
        result["pose_adherence"]["source"] = "world" if ep.detector == "world" else "real"  # whose detector
        if kind["pretrained_controlnet"]:  # the same prompts, poses and seeds before stage 2
            result["pretrained_controlnet"]["pose_adherence"] = adherence(kind["pretrained_controlnet"])
        if kind["unposed"]:  # chance: each pose-free image of a posed prompt against every target pose
            names = list(dict.fromkeys(entries[i]["pose"] for i in posed))
            files = {entries[i]["pose"]: entries[i]["pose_keypoints"] for i in posed}
            rows = [(i, n) for i in kind["unposed"] for n in names]
            result["unposed_against_targets"] = pose_adherence(
                detector, [generated[i] for i, _ in rows], [load_pose(Path(args.samples) / files[n]) for _, n in rows],
                [n for _, n in rows],
            )  # fmt: skip
    if result["stand_in"]:
        log.warning("stand-in backbones in use: these numbers test the pipeline and measure nothing")
    outputs.write_json(args.metrics, result)
    outputs.failpoint("evaluate:metrics-written")
    outputs.write_json(args.breakdown, breakdown)
    # One row per metric with its interval: a bar chart that `dvc plots diff` compares across experiments.
    rows = [{"metric": k, "value": result[k]["mean"], "ci_low": result[k]["ci_low"], "ci_high": result[k]["ci_high"],
             "n": result[k]["n"]} for k in ("dino", "clip_i", "clip_t", "lpips_diversity", "lpips_to_references")]  # fmt: skip
    if isinstance(result["pres"], dict):
        rows.append({"metric": "pres", "value": result["pres"]["mean"], "ci_low": result["pres"]["ci_low"],
                     "ci_high": result["pres"]["ci_high"], "n": result["pres"]["n"]})  # fmt: skip
    outputs.write_json(args.plot, rows)
    log.info("DINO %s  CLIP-I %s  CLIP-T %s  DIV %s over %d images (95 %% intervals in %s)",
             *(result[k]["mean"] for k in ("dino", "clip_i", "clip_t", "lpips_diversity")), len(subject),
             args.metrics)  # fmt: skip


if __name__ == "__main__":
    outputs.run_stage(main)
