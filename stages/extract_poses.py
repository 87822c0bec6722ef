"""extract_poses: keypoints and OpenPose-style pose maps for the instance and class images.

Reads:  params common.resolution, extract_poses.*; data/prepared (images, sidecar keypoints),
        data/class_priors (class images, and the poses of pose-paired ones, used as they are).
Writes: data/poses/ (keypoints/*.json, maps/*.png on black of each image's size, report.json),
        metrics/extract_poses.json.
Images without a usable pose are listed in the report (with why) and left out of pose training. The
sidecar detector has no annotations for class images: stage 2 then trains on instance pairs only.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from posebooth import config, outputs
from posebooth.detectors import SidecarDetector, make_detector
from posebooth.poses import render_pose_size

log = logging.getLogger("extract_poses")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--class-priors", default="data/class_priors")
    ap.add_argument("--out", default="data/poses")
    ap.add_argument("--metrics", default="metrics/extract_poses.json")
    args = ap.parse_args()
    outputs.claim("extract_poses", args.out, args.metrics)
    cfg = config.load(["common", "extract_poses"])
    e = cfg.extract_poses
    detector = make_detector(e.detector, e, cfg.common.device)

    prepared, priors = Path(args.prepared), Path(args.class_priors)
    items = [  # (kind, name, image file, sidecar keypoints or None, source)
        ("instance", r["name"], prepared / "images" / f"{r['name']}.png", prepared / "keypoints" / f"{r['name']}.json", r["source"])
        for r in outputs.read_json(prepared / "manifest.json")["images"]
    ] + [  # pose-paired class images carry the pose they were generated from
        ("class", Path(r["file"]).stem, priors / r["file"], priors / "keypoints" / f"{Path(r['file']).stem}.json", r["file"])
        for r in outputs.read_json(priors / "manifest.json")["images"]
    ]  # fmt: skip
    generating_pose = SidecarDetector()
    report = []
    with outputs.atomic_dir(args.out) as tmp:
        (tmp / "keypoints").mkdir()
        (tmp / "maps").mkdir()
        for kind, name, image_path, sidecar, source in tqdm(items, desc="poses", unit="img"):
            with Image.open(image_path) as im:
                image = im.convert("RGB")
            paired = kind == "class" and sidecar.exists()
            pose = (generating_pose if paired else detector).detect(image, sidecar)
            entry = {"name": name, "kind": kind, "source": source,
                     "detector": "pose-paired (the generating pose)" if paired else detector.name}  # fmt: skip
            if pose is None:
                why = (
                    "no annotation (sidecar keypoints exist only for your photos)"
                    if kind == "class" and e.detector == "sidecar"
                    else "no pose found"
                )
                entry.update(keypoints=0, mean_confidence=0.0, used=False, reason=f"{detector.name}: {why}")
            else:
                n = int(pose.visible.sum())
                used = n >= e.min_keypoints
                entry.update(
                    keypoints=n,
                    mean_confidence=round(float(pose.keypoints[pose.visible, 2].mean()), 4),
                    used=used,
                    reason=""
                    if used
                    else f"only {n} visible keypoints (extract_poses.min_keypoints={e.min_keypoints})",
                )
                if used:
                    outputs.write_json(tmp / "keypoints" / f"{name}.json", pose.to_json())
                    # the image's size: common.resolution square, or its aspect-ratio bucket (prepare_images.buckets)
                    width, height = image.size if kind == "instance" else (cfg.common.resolution,) * 2
                    render_pose_size(pose, width, height, e.render_size).save(tmp / "maps" / f"{name}.png")
            if kind == "instance" and not entry["used"]:
                log.warning("left out of pose training: %s (%s)", source, entry["reason"])
            report.append(entry)
        counts = {k: sum(r["used"] for r in report if r["kind"] == k) for k in ("instance", "class")}
        if counts["instance"] == 0:
            raise ValueError(
                f"extract_poses: no instance image has a usable pose (detector {e.detector!r}); add OpenPose-18 "
                "sidecar .json files next to the photos (see README) or try extract_poses.detector: openpose"
            )
        n_class = sum(r["kind"] == "class" for r in report)
        if n_class and counts["class"] == 0:
            log.info("class images have no poses (detector %s): stage 2 will train on instance pairs only", e.detector)
        outputs.write_json(tmp / "report.json", {"detector": e.detector, "images": report})
    n_inst = len(report) - n_class
    outputs.write_metrics(args.metrics, {
        "images": n_inst, "with_pose": counts["instance"], "left_out": n_inst - counts["instance"],
        "class_images": n_class, "class_with_pose": counts["class"],
    })  # fmt: skip
    log.info("%d of %d instance and %d of %d class image(s) have a usable pose",
             counts["instance"], n_inst, counts["class"], n_class)  # fmt: skip


if __name__ == "__main__":
    outputs.run_stage(main)
