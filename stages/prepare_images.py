"""prepare_images: the user's photos -> square training images (or aspect-ratio buckets) with their keypoints.

Reads:  params common.resolution, prepare_images.*; photos (and their *.json keypoint and *.txt caption
        sidecars) in prepare_images.input_dir.
Writes: data/prepared/ (images/*.png, keypoints/*.json, manifest.json with each photo's caption),
        metrics/prepare_images.json.
Source files are only read, never modified.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter

from posebooth import buckets, config, outputs
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

    res = cfg.common.resolution
    sizes = buckets.bucket_sizes(res * res, p.bucket_step, p.bucket_max_aspect) if p.buckets else None
    if sizes:
        log.info("aspect-ratio buckets (width x height): %s", ", ".join(f"{w}x{h}" for w, h in sizes))
    kept, skipped = prepare_folder(p.input_dir, res, p.min_source_size, p.crop, tuple(p.pad_color), sizes)
    for s in skipped:
        log.warning("skipped %s: %s", s.source, s.reason)
    if len(kept) < p.min_images:
        raise ValueError(
            f"prepare_images: only {len(kept)} usable photo(s) in {p.input_dir} (prepare_images.min_images is "
            f"{p.min_images}); add photos or lower the minimum. Skipped: "
            + ("; ".join(f"{s.source}: {s.reason}" for s in skipped) or "none")
        )
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
    if sizes:
        used = Counter(tuple(k.record["bucket"]) for k in kept)
        log.info("photos per bucket: %s", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(used.items())))


if __name__ == "__main__":
    outputs.run_stage(main)
