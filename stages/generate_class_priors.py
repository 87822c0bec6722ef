"""generate_class_priors: class images for DreamBooth's prior preservation.

Reads:  params common.*, generate_class_priors.*; the base model (common.model), or with
        ``source: folder`` the user's class photos in ``class_dir``.
Writes: data/class_priors/ (images/*.png, manifest.json with the prompt and seed of each image).
Image i uses seed ``common.seed * 1_000_000 + i``, so it is the same whatever the batch size. Generated
images are also cached outside the outputs (see posebooth/priors.py): a re-run after an interruption,
or after DVC deleted the outputs, generates only what is missing.
"""

from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

from posebooth import config, outputs, priors
from posebooth.generation import chunks, generate
from posebooth.models import load_components, sd_pipeline, weights_fingerprint
from posebooth.prepare import prepare_folder

log = logging.getLogger("generate_class_priors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/class_priors")
    args = ap.parse_args()
    cfg = config.load(["common", "generate_class_priors"])
    c, g = cfg.common, cfg.generate_class_priors
    outputs.seed_everything(c.seed)
    prompt = config.fill(c.class_prompt, c)

    with outputs.atomic_dir(args.out) as tmp:
        (tmp / "images").mkdir()
        if g.source == "folder":
            kept, skipped = prepare_folder(g.class_dir, c.resolution, 1)
            for s in skipped:
                log.warning("skipped class photo %s: %s", s.source, s.reason)
            kept = kept[: g.num_class_images]
            records = []
            for i, item in enumerate(kept):
                item.image.save(tmp / "images" / f"class_{i:04d}.png")
                records.append({"file": f"images/class_{i:04d}.png", "source": str(item.source)})
            manifest = {"source": "folder", "class_dir": g.class_dir, "prompt": prompt, "images": records}
        else:
            seeds = [c.seed * 1_000_000 + i for i in range(g.num_class_images)]
            key = priors.cache_key(
                model=weights_fingerprint(c.model), prompt=prompt, negative_prompt=g.negative_prompt,
                resolution=c.resolution, steps=g.steps, guidance_scale=g.guidance_scale, scheduler=g.scheduler,
                precision=c.precision,
            )  # fmt: skip
            cache = priors.cache_dir(key)
            images = {s: priors.load_cached(cache, s, c.resolution) for s in seeds}
            todo = [s for s in seeds if images[s] is None]
            log.info("%d of %d class image(s) found in the cache %s", len(seeds) - len(todo), len(seeds), cache)
            if todo:
                pipe = sd_pipeline(load_components(c.model, c.device, c.precision), g.scheduler)
                with tqdm(total=len(todo), desc="class priors", unit="img") as bar:
                    for batch in chunks(todo, g.batch_size):
                        made = generate(pipe, prompt, batch, steps=g.steps, guidance_scale=g.guidance_scale,
                                        resolution=c.resolution, negative_prompt=g.negative_prompt)  # fmt: skip
                        for seed, image in zip(batch, made, strict=True):
                            priors.store(cache, seed, image)  # at once: an interrupted run keeps its work
                            images[seed] = image
                        bar.update(len(batch))
            records = []
            for i, seed in enumerate(seeds):
                images[seed].save(tmp / "images" / f"class_{i:04d}.png")
                records.append({"file": f"images/class_{i:04d}.png", "seed": seed})
            manifest = {
                "source": "generate", "model": c.model, "prompt": prompt, "negative_prompt": g.negative_prompt,
                "resolution": c.resolution, "steps": g.steps, "guidance_scale": g.guidance_scale,
                "scheduler": g.scheduler, "precision": c.precision, "cache_key": key, "images": records,
            }  # fmt: skip
        outputs.write_json(tmp / "manifest.json", manifest)
    log.info("wrote %d class image(s) for %r to %s (%s)", len(records), prompt, args.out, g.source)


if __name__ == "__main__":
    outputs.run_stage(main)
