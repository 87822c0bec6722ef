"""evaluate: the DreamBooth paper's DINO, CLIP-I and CLIP-T, and LPIPS diversity, on the samples.

Reads:  params common.identifier, common.seed, common.device, evaluate.*, the extract_poses detector's
        settings; samples/ (index.json, images, poses/*.json target keypoints), data/prepared.
Writes: metrics/evaluate.json (cache: false, committed, so `dvc metrics diff` compares experiments).
DINO and CLIP-I compare every generated image with every prepared reference photo; CLIP-T compares each
image with its prompt, the identifier removed (the paper's text fidelity). Pose adherence: the pose is
detected again on each posed sample with the extract_poses detector and compared with its target
(detection rate, PCK@0.1 and @0.2, OKS AP, keypoint cosine; overall and per target pose); the sidecar
detector cannot read generated images, so it is then "not measured", with why.
Every number states how many images it rests on and whether its backbone is a stand-in.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image

from posebooth import config, data, outputs
from posebooth.backbones import ClipEmbedder, DinoEmbedder, is_stand_in, lpips_distance
from posebooth.detectors import make_detector
from posebooth.images import to_tensor
from posebooth.metrics import mean_matched_cosine, mean_pairwise_cosine, mean_pairwise_lpips, pose_adherence
from posebooth.poses import load_pose

log = logging.getLogger("evaluate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", default="samples")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--metrics", default="metrics/evaluate.json")
    args = ap.parse_args()
    cfg = config.load(["common", "evaluate", "extract_poses"])
    c, e = cfg.common, cfg.evaluate
    outputs.seed_everything(c.seed)

    index = outputs.read_json(Path(args.samples) / "index.json")
    entries = index["images"]
    generated = [Image.open(Path(args.samples) / r["file"]).convert("RGB") for r in entries]
    _, ref_pixels = data.instance_images(args.prepared, index["resolution"])
    references = [Image.fromarray(((p.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for p in ref_pixels]
    texts = [" ".join(w for w in r["prompt"].split() if w != c.identifier) for r in entries]

    clip, dino = ClipEmbedder(e.clip_model, c.device), DinoEmbedder(e.dino_model, c.device)
    clip_gen, clip_ref, clip_txt = clip.images(generated), clip.images(references), clip.texts(texts)
    dino_gen, dino_ref = dino.images(generated), dino.images(references)
    lpips = lpips_distance(e.lpips_net, c.device)

    def scores(rows: list[int]) -> dict:
        """The metrics over the generated images ``rows``."""
        groups: dict[tuple, list[int]] = {}
        for i in rows:
            groups.setdefault((entries[i]["prompt"], entries[i]["pose"]), []).append(i)
        div, pairs = mean_pairwise_lpips(
            [torch.stack([to_tensor(generated[i]) for i in g]).to(c.device) for g in groups.values()], lpips
        )
        return {
            "dino": round(mean_pairwise_cosine(dino_gen[rows], dino_ref), 6),
            "clip_i": round(mean_pairwise_cosine(clip_gen[rows], clip_ref), 6),
            "clip_t": round(mean_matched_cosine(clip_gen[rows], clip_txt[rows]), 6),
            "lpips_diversity": None if div is None else round(div, 6),
            "n_images": len(rows),
            "n_lpips_pairs": pairs,
        }

    everything = list(range(len(entries)))
    result = scores(everything)
    result["n_references"] = len(references)
    posed = [i for i in everything if entries[i]["pose"] is not None]
    free = [i for i in everything if entries[i]["pose"] is None]
    if posed:
        result["posed"] = scores(posed)
    if free:
        result["pose_free"] = scores(free)
    result["backbones"] = {
        "clip": {"model": e.clip_model, "stand_in": is_stand_in(e.clip_model)},
        "dino": {"model": e.dino_model, "stand_in": is_stand_in(e.dino_model)},
        "lpips": {"model": e.lpips_net, "stand_in": is_stand_in(e.lpips_net)},
    }
    result["stand_in"] = any(b["stand_in"] for b in result["backbones"].values())
    ep = cfg.extract_poses
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
    log.info("DINO %.3f  CLIP-I %.3f  CLIP-T %.3f  LPIPS-div %s over %d images",
             result["dino"], result["clip_i"], result["clip_t"], result["lpips_diversity"], len(entries))  # fmt: skip


if __name__ == "__main__":
    outputs.run_stage(main)
