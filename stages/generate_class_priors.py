"""generate_class_priors: class images from the frozen base model, for DreamBooth's prior preservation.

Reads:  params common.*, generate_class_priors.*; the base model (common.model).
Writes: data/class_priors/ (images/*.png, manifest.json with the prompt and seed of each image).
Image i uses seed ``common.seed * 1_000_000 + i``, so it is the same whatever the batch size.
"""

from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

from posebooth import config, outputs
from posebooth.generation import chunks, generate
from posebooth.models import load_components, sd_pipeline

log = logging.getLogger("generate_class_priors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/class_priors")
    args = ap.parse_args()
    cfg = config.load(["common", "generate_class_priors"])
    c, g = cfg.common, cfg.generate_class_priors
    outputs.seed_everything(c.seed)

    prompt = config.fill(c.class_prompt, c)
    seeds = [c.seed * 1_000_000 + i for i in range(g.num_class_images)]
    records = []
    with outputs.atomic_dir(args.out) as tmp:
        (tmp / "images").mkdir()
        if seeds:
            pipe = sd_pipeline(load_components(c.model, c.device), g.scheduler)
            with tqdm(total=len(seeds), desc="class priors", unit="img") as bar:
                for batch in chunks(seeds, g.batch_size):
                    images = generate(
                        pipe, prompt, batch, steps=g.steps, guidance_scale=g.guidance_scale, resolution=c.resolution
                    )
                    for seed, image in zip(batch, images, strict=False):
                        name = f"class_{len(records):04d}.png"
                        image.save(tmp / "images" / name)
                        records.append({"file": f"images/{name}", "seed": seed})
                    bar.update(len(batch))
        manifest = {
            "model": c.model, "prompt": prompt, "resolution": c.resolution, "steps": g.steps,
            "guidance_scale": g.guidance_scale, "scheduler": g.scheduler, "images": records,
        }  # fmt: skip
        outputs.write_json(tmp / "manifest.json", manifest)
    log.info("wrote %d class image(s) for %r to %s", len(records), prompt, args.out)


if __name__ == "__main__":
    outputs.run_stage(main)
