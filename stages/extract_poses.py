"""extract_poses: keypoints and OpenPose-style pose maps for the prepared instance images.

Reads:  params common.resolution, extract_poses.*; data/prepared (images, keypoints from sidecars).
Writes: data/poses/ (keypoints/*.json, maps/*.png on black, report.json), metrics/extract_poses.json.
Images without a usable pose are listed in the report and left out of pose training.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image

from posebooth import config, outputs
from posebooth.poses import make_detector, render_pose

log = logging.getLogger("extract_poses")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--out", default="data/poses")
    ap.add_argument("--metrics", default="metrics/extract_poses.json")
    args = ap.parse_args()
    cfg = config.load(["common", "extract_poses"])
    e = cfg.extract_poses
    detector = make_detector(e.detector)

    prepared = Path(args.prepared)
    manifest = outputs.read_json(prepared / "manifest.json")
    report = []
    with outputs.atomic_dir(args.out) as tmp:
        (tmp / "keypoints").mkdir()
        (tmp / "maps").mkdir()
        for rec in manifest["images"]:
            name = rec["name"]
            with Image.open(prepared / "images" / f"{name}.png") as im:
                image = im.convert("RGB")
            pose = detector.detect(image, prepared / "keypoints" / f"{name}.json")
            entry = {"name": name, "source": rec["source"], "detector": detector.name}
            if pose is None:
                entry.update(keypoints=0, mean_confidence=0.0, used=False, reason=f"{detector.name}: no pose found")
            else:
                n = int(pose.visible.sum())
                conf = float(pose.keypoints[pose.visible, 2].mean()) if n else 0.0
                used = n >= e.min_keypoints
                reason = "" if used else f"only {n} visible keypoints (extract_poses.min_keypoints={e.min_keypoints})"
                entry.update(keypoints=n, mean_confidence=round(conf, 4), used=used, reason=reason)
                if used:
                    outputs.write_json(tmp / "keypoints" / f"{name}.json", pose.to_json())
                    render_pose(pose, cfg.common.resolution, e.render_size).save(tmp / "maps" / f"{name}.png")
            if not entry["used"]:
                log.warning("left out of pose training: %s (%s)", rec["source"], entry["reason"])
            report.append(entry)
        used = sum(r["used"] for r in report)
        if used == 0:
            raise SystemExit(
                f"extract_poses: no prepared image has a usable pose ({len(report)} tried with detector "
                f"{e.detector!r}); add OpenPose-18 sidecar .json files next to the photos (see README)"
            )
        outputs.write_json(tmp / "report.json", {"detector": e.detector, "images": report})
    outputs.write_json(args.metrics, {"images": len(report), "with_pose": used, "left_out": len(report) - used})
    log.info("%d of %d image(s) have a usable pose", used, len(report))


if __name__ == "__main__":
    outputs.run_stage(main)
