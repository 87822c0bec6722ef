"""prepare_images: the user's photos -> square training images with their keypoints.

Reads:  params common.resolution, prepare_images.*; photos (and their *.json keypoint and *.txt caption
        sidecars) in prepare_images.input_dir.
Writes: data/prepared/ (images/*.png, keypoints/*.json, manifest.json with each photo's caption),
        metrics/prepare_images.json.
Source files are only read, never modified.
"""

from __future__ import annotations

import argparse
import logging

from posebooth import config, outputs
from posebooth.prepare import prepare_folder, write_prepared

log = logging.getLogger("prepare_images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/prepared")
    ap.add_argument("--metrics", default="metrics/prepare_images.json")
    args = ap.parse_args()
    outputs.claim("prepare_images", args.out, args.metrics)
    cfg = config.load(["common", "prepare_images"])
    p = cfg.prepare_images

    kept, skipped = prepare_folder(p.input_dir, cfg.common.resolution, p.min_source_size, p.crop, tuple(p.pad_color))
    for s in skipped:
        log.warning("skipped %s: %s", s.source, s.reason)
    if len(kept) < p.min_images:
        raise ValueError(
            f"prepare_images: only {len(kept)} usable photo(s) in {p.input_dir} (prepare_images.min_images is "
            f"{p.min_images}); add photos or lower the minimum. Skipped: "
            + ("; ".join(f"{s.source}: {s.reason}" for s in skipped) or "none")
        )
    res = cfg.common.resolution
    outputs.require_free_space({args.out: len(kept) * res * res * 3 * 2}, "prepare_images")  # PNGs, keypoints
    with outputs.atomic_dir(args.out) as tmp:
        write_prepared(tmp, kept, skipped)
    outputs.write_metrics(
        args.metrics,
        {
            "images": len(kept),
            "skipped": len(skipped),
            "with_keypoints": sum(k.pose is not None for k in kept),
            "with_captions": sum(k.record["caption"] is not None for k in kept),
            "face_crops": sum(k.record["crop"].startswith("face") for k in kept),
        },
    )
    log.info("prepared %d image(s), skipped %d, into %s", len(kept), len(skipped), args.out)


if __name__ == "__main__":
    outputs.run_stage(main)
