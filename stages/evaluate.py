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
and pose. Every number states how many images it rests on and whether its backbone is a stand-in.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image

from posebooth import config, data, faceid, fidelity, outputs, stats
from posebooth.backbones import ClipEmbedder, DinoEmbedder, is_stand_in, lpips_distance
from posebooth.detectors import make_detector
from posebooth.images import to_tensor
from posebooth.metrics import (
    lpips_to_references,
    matched_cosine,
    pairwise_lpips,
    per_image_cosine,
    pose_adherence,
)  # fmt: skip
from posebooth.poses import load_pose

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
        "clip": {"model": e.clip_model, "stand_in": is_stand_in(e.clip_model)},
        "dino": {"model": e.dino_model, "stand_in": is_stand_in(e.dino_model)},
        "lpips": {"model": e.lpips_net, "stand_in": is_stand_in(e.lpips_net)},
        "fid": {"model": e.fid_model, "stand_in": e.fid_model == fidelity.TINY},
    }
    result["stand_in"] = any(b["stand_in"] for b in result["backbones"].values())
    ep = cfg.extract_poses
    posed = [i for i in subject if entries[i]["pose"] is not None]
    if not posed:
        result["pose_adherence"] = "not measured: no posed samples"
    elif ep.detector == "sidecar":  # sidecar keypoints exist only for the training photos
        result["pose_adherence"] = "not measured: the sidecar detector cannot detect poses on generated images"
    else:
        targets = [load_pose(Path(args.samples) / entries[i]["pose_keypoints"]) for i in posed]
        detector = make_detector(ep.detector, ep, c.device)
        result["pose_adherence"] = pose_adherence(
            detector, [generated[i] for i in posed], targets, [entries[i]["pose"] for i in posed]
        )
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
