"""How much subject verification the world's VAE leaves reachable: the ceiling of issue 16's identity bar.

Every generated image is decoded by the base model's VAE, so no sample can look more like the subject than the
subject's own photos after a round trip through it (encode, posterior mean, decode). For each prepared photo this
prints the world DINO score (mean cosine to the *other* photos, as evaluate scores a sample against the references)
of the photo itself and of its VAE round trip, and the fraction that passes the DINO model's calibrated
same-instance threshold; with ``--samples`` also the pose-free subject samples of the last ``dvc repro``.

    python benchmarks/world_ceiling.py [--prepared data/prepared] [--samples samples]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def leave_one_out(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N,) mean cosine of query i to every reference but i: (N, D) and (N, D) embeddings."""
    from posebooth.metrics import per_image_cosine

    n = len(references)
    return torch.stack([per_image_cosine(queries[i : i + 1], references[torch.arange(n) != i])[0] for i in range(n)])


def round_trip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """``images`` encoded to the VAE's posterior mean and decoded back, as RGB images."""
    from posebooth.images import to_tensor

    pixels = torch.stack([to_tensor(im) for im in images])  # (N, 3, H, W) in [-1, 1]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in decoded]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", default="data/prepared", help="prepare_images' output (images/*.png)")
    ap.add_argument("--samples", default="", help="sample's output folder (index.json) to score beside, or none")
    ap.add_argument("--model", default="embedded:world")
    ap.add_argument("--dino", default="embedded:world-dino")
    args = ap.parse_args()

    from posebooth.backbones import DinoEmbedder
    from posebooth.metrics import per_image_cosine
    from posebooth.models import load_components

    dino = DinoEmbedder(args.dino)
    if dino.calibration is None:
        raise SystemExit(f"{args.dino} carries no verification.json threshold")
    threshold = dino.calibration["threshold"]
    files = sorted((Path(args.prepared) / "images").glob("*.png"))
    if len(files) < 2:
        raise SystemExit(f"{args.prepared}/images: needs at least two prepared photos (run dvc repro prepare_images)")
    photos = [Image.open(f).convert("RGB") for f in files]
    references = dino.images(photos)
    decoded = dino.images(round_trip(load_components(args.model).vae, photos))
    rows = {
        "the photos themselves": leave_one_out(references, references),
        "their VAE round trip": leave_one_out(decoded, references),
    }
    if args.samples:
        index = json.loads((Path(args.samples) / "index.json").read_text())
        pose_free = [e for e in index["images"] if e.get("kind", "subject") == "subject" and not e.get("pose")]
        if pose_free:
            images = [Image.open(Path(args.samples) / e["file"]).convert("RGB") for e in pose_free]
            rows["pose-free subject samples"] = per_image_cosine(dino.images(images), references)
    print(f"world DINO same-instance threshold {threshold:.3f} (EER {dino.calibration['eer']:.3f})")
    print(f"{'images':<28} {'n':>3} {'mean score':>10} {'min':>6} {'max':>6} {'verified':>8}")
    for name, scores in rows.items():
        print(f"{name:<28} {len(scores):>3} {scores.mean():>10.3f} {scores.min():>6.3f} {scores.max():>6.3f} "
              f"{(scores >= threshold).float().mean():>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
