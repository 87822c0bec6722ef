"""evaluate: the DreamBooth paper's DINO, CLIP-I, CLIP-T, PRES and DIV, LPIPS, and pose adherence.

Reads:  params common.identifier, common.seed, common.device, evaluate.*, the extract_poses detector's
        settings; samples/ (index.json, images, poses/*.json target keypoints), data/prepared.
Writes: metrics/evaluate.json (cache: false, committed, so `dvc metrics diff` compares experiments):
        each metric as mean, 95 % bootstrap interval (ci_low, ci_high) and n, overall, posed, pose-free;
        only numbers or null, under the same keys in every configuration (posebooth/scorecard.py);
        metrics/evaluate.info.json: the backbones and pose detector used, and why each null is not measured;
        metrics/evaluate_breakdown.json: the same per prompt and per target pose.
DINO and CLIP-I compare every generated image with every prepared reference photo; CLIP-T compares each
image with its prompt, the identifier removed (the paper's text fidelity). Pose adherence: the pose is
detected again on each posed sample with the extract_poses detector and compared with its target
(detection rate, PCK@0.1 and @0.2, OKS AP, keypoint cosine; overall, and per target pose in the breakdown);
the sidecar detector cannot read generated images, so it is then null, and the info file says why.
PRES (language drift, the paper's prior preservation): DINO of the trained model's class-prompt images
(sample.prior_images) to the subject's photos; lower is better. DIV: LPIPS between images of one prompt
and pose. Every number states how many images it rests on; the info file says where each backbone comes from
("real", "world": the procedural world's measuring models, or "stand-in": random weights that measure nothing).
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

from posebooth import config, data, faceid, fidelity, outputs, scorecard
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
    ap.add_argument("--info", default="metrics/evaluate.info.json")
    ap.add_argument("--breakdown", default="metrics/evaluate_breakdown.json")
    ap.add_argument("--plot", default="plots/evaluate_metrics.json")
    args = ap.parse_args()
    outputs.claim("evaluate", args.metrics, args.info, args.breakdown, args.plot)
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
    # Context accuracy: which of DreamBench's contexts CLIP reads in the image, against the one its prompt names.
    contexts = context_prompts(c.class_noun)  # {context: text}
    named = [context_of(r["prompt"]) for r in entries]
    per_image["context_accuracy"] = zero_shot_correct(
        clip_gen, clip.texts(list(contexts.values())), [list(contexts).index(n) if n else None for n in named]
    )

    def diversity(groups: list[list[int]]) -> list[float]:
        """LPIPS between the images of each group (one prompt and pose): DIV."""
        return pairwise_lpips([torch.stack([pixels[i] for i in g]) for g in groups], lpips)

    subject = [i for i, r in enumerate(entries) if r.get("kind", "subject") == "subject"]
    if e.fid_model == "none":
        fid_kid = "evaluate.fid_model is none"
    else:  # the subject's images against the reference photos; KID's subset fits the smaller set
        extractor = fidelity.register(e.fid_model, e.inception_weights)
        fid_kid = fidelity.fid_kid([generated[i] for i in subject], references, extractor, c.seed)
    if e.face_identity == "off" or (e.face_identity == "auto" and not faceid.is_person(c.class_noun)):
        face_identity = f"evaluate.face_identity is {e.face_identity} (class {c.class_noun!r})"
    else:
        try:
            embed = faceid.FacenetEmbedder(e.face_weights, c.device)
        except OSError as err:  # optional: the rest of the evaluation goes on without it
            face_identity = str(err)
        else:
            face_identity = faceid.face_similarity([generated[i] for i in subject], references, embed, c.seed)
    ep = cfg.extract_poses
    if ep.detector == "sidecar":  # sidecar keypoints exist only for the training photos
        adherence = "the sidecar detector cannot detect poses on generated images"
    else:
        detector = make_detector(ep.detector, ep, c.device)
        files = {r["pose"]: r["pose_keypoints"] for r in entries if r["pose"] is not None}

        def adherence(rows: list[int], names: list[str]) -> dict:
            """The pose detected again on the images ``rows`` against the target poses ``names``."""
            targets = [load_pose(Path(args.samples) / files[n]) for n in names]
            return pose_adherence(detector, [generated[i] for i in rows], targets, names)

    backbones = {
        "clip": {"model": e.clip_model, "stand_in": is_stand_in(e.clip_model), "source": source(e.clip_model)},
        "dino": {"model": e.dino_model, "stand_in": is_stand_in(e.dino_model), "source": source(e.dino_model)},
        "lpips": {"model": e.lpips_net, "stand_in": is_stand_in(e.lpips_net), "source": source(e.lpips_net)},
        "fid": {"model": e.fid_model, "stand_in": e.fid_model == fidelity.TINY,
                "source": "stand-in" if e.fid_model == fidelity.TINY else "real"},
    }  # fmt: skip
    pose_detector = {"detector": ep.detector, "source": "world" if ep.detector == "world" else "real"}  # whose
    result, breakdown, info = scorecard.assemble(
        entries,
        per_image,
        diversity,
        adherence,
        fid_kid,
        face_identity,
        backbones,
        pose_detector,
        len(references),
        dino.calibration,
        c.seed,
    )
    if note := scorecard.stand_in_note(backbones):
        log.warning(note)
    outputs.write_metrics(args.metrics, result)
    outputs.failpoint("evaluate:metrics-written")
    outputs.write_json(args.info, info)
    outputs.write_json(args.breakdown, breakdown)
    # One row per metric with its interval: a bar chart that `dvc plots diff` compares across experiments.
    rows = [{"metric": k, "value": result[k]["mean"], "ci_low": result[k]["ci_low"], "ci_high": result[k]["ci_high"],
             "n": result[k]["n"]} for k in ("dino", "clip_i", "clip_t", "lpips_diversity", "lpips_to_references", "pres")
            if result[k]["mean"] is not None]  # fmt: skip
    outputs.write_json(args.plot, rows)
    log.info("DINO %s  CLIP-I %s  CLIP-T %s  DIV %s over %d images (95 %% intervals in %s)",
             *(result[k]["mean"] for k in ("dino", "clip_i", "clip_t", "lpips_diversity")), len(subject),
             args.metrics)  # fmt: skip


if __name__ == "__main__":
    outputs.run_stage(main)
