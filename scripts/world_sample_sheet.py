"""A contact sheet of procedural-world scenes, each at its real size (64 px) magnified without smoothing,
with its full caption underneath; for people to judge that subjects, colours and backgrounds read.

    python scripts/world_sample_sheet.py [--out $TMPDIR/world_sheet.png] [--seed 0] [--rows 8] [--cols 8]
        [--keypoints] [--subject] [--classes robot dog] [--contexts beach snow]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posebooth.world import CLASSES, CONTEXTS, caption, iter_scenes, render, subject_photos  # noqa: E402

FULL = {"colour": 1.0, "context": 1.0, "shape": 1.0, "marking": 1.0, "build": 1.0}  # every word


def cell(image: Image.Image, keypoints: dict | None, scale: int, show_keypoints: bool) -> Image.Image:
    """One scene magnified ``scale`` times (nearest neighbour: the real pixels), keypoints as dots."""
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    if show_keypoints and keypoints is not None:
        d = ImageDraw.Draw(big)
        rows = keypoints["keypoints"]
        points = rows if isinstance(rows, list) else list(rows.values())
        for x, y, c in points:
            if c > 0:
                d.ellipse([x * scale - 2, y * scale - 2, x * scale + 2, y * scale + 2], fill=(255, 0, 255))
    return big


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "world_sheet.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="render size in pixels")
    ap.add_argument("--scale", type=int, default=2, help="magnification on the sheet")
    ap.add_argument("--classes", nargs="+", default=list(CLASSES))
    ap.add_argument("--contexts", nargs="+", default=None, choices=list(CONTEXTS))
    ap.add_argument("--keypoints", action="store_true", help="mark the keypoints")
    ap.add_argument("--subject", action="store_true", help="the held-out SUBJECT only (subject_photos)")
    args = ap.parse_args()

    n = args.rows * args.cols
    if args.subject:
        shots = subject_photos(args.seed, n, args.size, contexts=args.contexts)
    else:
        shots = [(s, *render(s, args.size)) for s in iter_scenes(args.seed, n, args.classes, args.contexts)]
    rng = np.random.default_rng(args.seed)
    font = ImageFont.load_default()
    side, text_h, pad = args.size * args.scale, 60, 4
    chars = max(8, side // 6)
    sheet = Image.new("RGB", (args.cols * (side + pad) + pad, args.rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (scene, image, keypoints) in enumerate(shots):
        left = pad + (i % args.cols) * (side + pad)
        top = pad + (i // args.cols) * (side + text_h + pad)
        sheet.paste(cell(image, keypoints, args.scale, args.keypoints), (left, top))
        text = caption(scene, rng, keep=FULL, class_only=0.0).removeprefix("a photo of ")
        for k, line in enumerate(textwrap.wrap(text, chars)[: text_h // 11]):
            draw.text((left, top + side + 1 + 11 * k), line, fill="black", font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {len(shots)} scenes to {args.out}")


if __name__ == "__main__":
    main()
