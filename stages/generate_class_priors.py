"""generate_class_priors: class images for DreamBooth's prior preservation.

Reads:  params common.*, generate_class_priors.*, the extract_poses detector's settings; the base model
        (common.model), or with ``source: folder`` the user's class photos in ``class_dir``; with
        ``pose_paired``, data/prepared (the instance photos, whose poses it reads itself: this stage runs
        before extract_poses).
Writes: data/class_priors/ (images/*.png, manifest.json with the prompt and seed of each image; with
        ``pose_paired``, keypoints/*.json: the instance pose each class image was generated from).
Pose-paired priors (the seed project's): class image i is generated through the base OpenPose
ControlNet (``controlnet``) from the pose of instance photo i mod N, so that each prior sample of stage 2
is (class image, the same pose, class prompt).
Image i uses seed ``common.seed * 1_000_000 + i``, so it is the same whatever the batch size. Generated
images are also cached outside the outputs (see posebooth/image_cache.py): a re-run after an interruption,
or after DVC deleted the outputs, generates only what is missing.
"""

from __future__ import annotations

import argparse
import logging

from PIL import Image
from tqdm import tqdm

from posebooth import config, image_cache, outputs
from posebooth.detectors import make_detector
from posebooth.generation import generate, plan_batches
from posebooth.models import (
    check_controlnet_fits,
    load_components,
    load_controlnet,
    sd_pipeline,
    weights_fingerprint,
)
from posebooth.poses import fit_square, render_pose
from posebooth.prepare import prepare_folder

log = logging.getLogger("generate_class_priors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/class_priors")
    ap.add_argument("--prepared", default="data/prepared")
    args = ap.parse_args()
    outputs.claim("generate_class_priors", args.out)
    cfg = config.load(["common", "generate_class_priors", "extract_poses"])
    c, g, ep = cfg.common, cfg.generate_class_priors, cfg.extract_poses
    outputs.seed_everything(c.seed, c.deterministic)
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
            poses = instance_poses(args.prepared, ep, c.device) if g.pose_paired else []
            pose_of = {s: poses[i % len(poses)] for i, s in enumerate(seeds)} if poses else {}
            key = image_cache.cache_key(
                model=weights_fingerprint(c.model), prompt=prompt, negative_prompt=g.negative_prompt,
                resolution=c.resolution, steps=g.steps, guidance_scale=g.guidance_scale, scheduler=g.scheduler,
                precision=c.precision, **({"vae": weights_fingerprint(c.vae)} if c.vae else {}),
                **({"model_config": weights_fingerprint(c.model_config)} if c.model_config else {}),
                **({"controlnet": weights_fingerprint(g.controlnet), "render_size": ep.render_size,
                    "poses": [p.to_json() for _, p in poses]} if poses else {}),
            )  # fmt: skip
            cache = image_cache.cache_dir(key)
            images = {s: image_cache.load_cached(cache, s, c.resolution) for s in seeds}
            # Batches of one pose each (a batch shares its control image).
            groups = [[s for s in seeds if pose_of[s][0] == name] for name, _ in poses] if poses else [seeds]
            _, todo = plan_batches(groups, g.batch_size, images)
            found = sum(image is not None for image in images.values())
            log.info("%d of %d class image(s) found in the cache %s; %d batch(es) of %d to make", found, len(seeds),
                     cache, len(todo), g.batch_size)  # fmt: skip
            outputs.require_free_space(
                {cache: sum(map(len, todo)) * 3 * c.resolution**2, args.out: len(seeds) * 3 * c.resolution**2},
                "generate_class_priors",
            )
            if todo:
                controlnet = load_controlnet(g.controlnet, None, c.device, c.precision) if poses else None
                comp = load_components(c.model, c.device, c.precision, c.vae, c.model_config)
                if controlnet is not None:
                    check_controlnet_fits(controlnet, comp.unet, "generate_class_priors.controlnet")
                pipe = sd_pipeline(comp, g.scheduler, controlnet)
                with tqdm(total=sum(map(len, todo)), desc="class priors", unit="img") as bar:
                    for batch in todo:
                        control = (
                            {"control_image": render_pose(pose_of[batch[0]][1], c.resolution, ep.render_size)}
                            if poses else {}
                        )  # fmt: skip
                        made = generate(pipe, prompt, batch, steps=g.steps, guidance_scale=g.guidance_scale,
                                        resolution=c.resolution, negative_prompt=g.negative_prompt, **control)  # fmt: skip
                        for seed, image in zip(batch, made, strict=True):
                            image_cache.store(cache, seed, image)  # at once: an interrupted run keeps its work
                            images[seed] = image
                        bar.update(len(batch))
                        outputs.failpoint("class-priors:batch")
            records = []
            if poses:
                (tmp / "keypoints").mkdir()
            for i, seed in enumerate(seeds):
                images[seed].save(tmp / "images" / f"class_{i:04d}.png")
                records.append({"file": f"images/class_{i:04d}.png", "seed": seed})
                if poses:  # the pose it was generated from, on its canvas (drawn letterboxed, so fitted)
                    name, pose = pose_of[seed]
                    keypoints = fit_square(pose, c.resolution).to_json()
                    outputs.write_json(tmp / "keypoints" / f"class_{i:04d}.json", keypoints)
                    records[-1]["pose_from"] = name
            # null, not "", for no negative prompt: what generation.generate passes, and what SDXL pipelines
            # treat differently (zeros for None, the encoded "" otherwise), so a record replays exactly.
            manifest = {
                "source": "generate", "model": c.model, "prompt": prompt, "negative_prompt": g.negative_prompt or None,
                "resolution": c.resolution, "steps": g.steps, "guidance_scale": g.guidance_scale,
                "scheduler": g.scheduler, "precision": c.precision, "cache_key": key, "images": records,
                "pose_paired": bool(poses), "controlnet": g.controlnet if poses else None,
            }  # fmt: skip
        outputs.write_json(tmp / "manifest.json", manifest)
    log.info("wrote %d class image(s) for %r to %s (%s)", len(records), prompt, args.out, g.source)


def instance_poses(prepared: str, ep, device: str) -> list[tuple[str, object]]:
    """(name, pose) of the prepared instance photos with a usable pose, read with the extract_poses
    detector (the sidecar detector reads the keypoints prepare_images mapped)."""
    from pathlib import Path

    detector = make_detector(ep.detector, ep, device)
    found = []
    for record in outputs.read_json(Path(prepared) / "manifest.json")["images"]:
        name = record["name"]
        with Image.open(Path(prepared) / "images" / f"{name}.png") as im:
            pose = detector.detect(im.convert("RGB"), Path(prepared) / "keypoints" / f"{name}.json")
        if pose is not None and pose.visible.sum() >= ep.min_keypoints:
            found.append((name, pose))
    if not found:
        raise ValueError(
            f"generate_class_priors.pose_paired: no instance photo in {prepared} has a usable pose "
            f"(detector {ep.detector}); add keypoint sidecars or set pose_paired: false"
        )
    return found


if __name__ == "__main__":
    outputs.run_stage(main)
