"""sample: the subject in the target poses, from the stage-1 LoRA plus the stage-2 ControlNet.

Reads:  params common.*, sample.*, extract_poses.*; models/stage1, models/stage2, the target poses in
        sample.poses (keypoint files or reference images under data/target_poses, each optionally
        mirrored or rescaled; images go through the extract_poses detector).
Writes: samples/ (images/*.png, poses/*.png and the target keypoints poses/*.json, index.json saying
        what produced each image: its kind, prompt, pose, seed and settings),
        plots/sample_grid.png (a labelled contact sheet: one row per prompt and pose, one column per seed).
Kinds: "subject" (the trained subject, pose-free and in each target pose), "class" (the class prompt through
the trained model: PRES). With sample.baselines, what evaluate compares them with: "base" (the base model
without the subject, each prompt with the identifier removed), "base_class" (the class prompt through the
base model), "pretrained_controlnet" (the posed prompts through train_pose.controlnet, the ControlNet before
stage 2) and "unposed" (the posed prompts without a pose: what the pose adds).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
from pathlib import Path

from tqdm import tqdm

from posebooth import checkpoints, config, image_cache, outputs, subject
from posebooth.detectors import make_detector
from posebooth.generation import generate, plan_batches
from posebooth.grid import contact_sheet
from posebooth.models import load_components, load_controlnet, sd_pipeline, weights_fingerprint
from posebooth.poses import IMAGE_SUFFIXES, load_target_poses, parse_pose_entry, render_pose

log = logging.getLogger("sample")


# How the contact sheet labels each kind of image (see the docstring).
KIND_LABELS = {"subject": "", "class": "", "base": " | base model", "base_class": " | base model",
               "pretrained_controlnet": " | ControlNet before stage 2", "unposed": " | no pose (baseline)"}  # fmt: skip


def pipeline_of(pose: str | None, kind: str) -> str:
    """Which pipeline makes an image of ``kind`` with ``pose`` (None: pose-free)."""
    if kind in ("base", "base_class"):
        return "base"
    if kind == "pretrained_controlnet":
        return kind
    return "free" if pose is None else "posed"


def without_identifier(template: str, identifier: str) -> str:
    """The prompt template with the identifier (and its placeholder) removed: what the base model is asked."""
    words = template.replace("{identifier}", identifier).split()
    return " ".join(w for w in words if w != identifier)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage1", default="models/stage1")
    ap.add_argument("--stage2", default="models/stage2")
    ap.add_argument("--out", default="samples")
    ap.add_argument("--grid", default="plots/sample_grid.png")
    ap.add_argument("--target-poses", default="data/target_poses")
    ap.add_argument("--loras", default="data/loras")
    args = ap.parse_args()
    outputs.claim("sample", args.out, args.grid)
    cfg = config.load(["common", "sample", "extract_poses", "train_pose"])
    c, s = cfg.common, cfg.sample
    outputs.seed_everything(c.seed, c.deterministic)
    ep = cfg.extract_poses
    images = [p for p in s.poses if parse_pose_entry(p)[0].suffix.lower() in IMAGE_SUFFIXES]
    detect = make_detector(ep.detector, ep, c.device).detect if images and ep.detector != "sidecar" else None
    poses = load_target_poses(s.poses, args.target_poses, detect)  # validated before any model loads

    comp = load_components(
        subject.base_model(args.stage1, c.model), c.device, c.precision, c.vae, c.model_config
    )  # full: stage 1's own
    extras = list(zip(s.extra_loras, s.extra_lora_weights, strict=True))
    for path, _ in extras:
        if Path(args.loras).resolve() not in Path(path).resolve().parents:
            raise ValueError(f"sample.extra_loras: {path} must lie in {args.loras}/ (the folder dvc.yaml tracks)")
    posed, free = subject.trained_pipelines(comp, args.stage1, args.stage2, s.scheduler, c.device, c.precision,
                                    s.cpu_offload, s.subject_lora_scale, extras)  # fmt: skip
    pipelines = {"free": free, "posed": posed}

    pose_prompts = s.pose_prompts or s.prompts
    jobs = [(p, None, "subject") for p in s.prompts] if s.pose_free else []
    jobs += [(p, name, "subject") for p in pose_prompts for name in poses]
    if s.prior_images:  # the class prompt through the trained model: PRES (language drift) in evaluate
        jobs.append((c.class_prompt, None, "class"))
    if s.baselines:  # what the trained subject and the stage-2 ControlNet are compared with
        base = load_components(c.model, c.device, c.precision, c.vae, c.model_config)
        pipelines["base"] = sd_pipeline(base, s.scheduler)
        pretrained = load_controlnet(
            cfg.train_pose.controlnet, base.unet, c.device, c.precision, c.model, c.model_config
        )
        pipelines["pretrained_controlnet"] = sd_pipeline(comp, s.scheduler, pretrained)
        jobs += [(without_identifier(p, c.identifier), None, "base") for p in s.prompts]
        jobs += [(c.class_prompt, None, "base_class")] if s.prior_images else []
        jobs += [(p, name, "pretrained_controlnet") for p in pose_prompts for name in poses]
        jobs += [(p, None, "unposed") for p in pose_prompts]
    # Resumable: each finished batch is kept in a cache keyed by everything that makes the images (params, the
    # trained models, the target poses), so a re-run after an interruption makes only the rest.
    inputs = [args.stage1, args.stage2, args.target_poses] + ([args.loras] if extras else [])
    weights = {"model": weights_fingerprint(c.model), "vae": weights_fingerprint(c.vae) if c.vae else ""}
    key = checkpoints.fingerprint(cfg.as_dict() | weights, inputs)
    # Per workspace, like checkpoints (unlike class priors): the stage deletes this cache when it finishes, so an
    # equal experiment running in another workspace (`dvc queue start -j 2`) must not share it.
    cache = image_cache.cache_dir(checkpoints.per_workspace(key), "samples")
    image_bytes = len(jobs) * len(s.seeds) * 3 * c.resolution**2
    outputs.require_free_space({cache: image_bytes, args.out: image_bytes}, "sample")
    index, rows = [], []
    with outputs.atomic_dir(args.out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "poses").mkdir()
        # Drawn like the training pose maps (same stick width relative to the image).
        pose_maps = {name: render_pose(p, c.resolution, cfg.extract_poses.render_size) for name, p in poses.items()}
        for name, image in pose_maps.items():
            image.save(tmp / "poses" / f"{name}.png")
            outputs.write_json(tmp / "poses" / f"{name}.json", poses[name].to_json())  # what evaluate compares with
        # Batches of sample.batch_size images across prompts and seeds (pose-free and posed images apart: they
        # go through different pipelines), each cached as soon as it is made.
        common = dict(steps=s.steps, guidance_scale=s.guidance_scale, resolution=c.resolution,
                      negative_prompt=s.negative_prompt)  # fmt: skip
        items = [(j, seed) for j in range(len(jobs)) for seed in s.seeds]
        made = {it: image_cache.load_cached(cache, f"{it[0]:03d}_s{it[1]}", c.resolution) for it in items}
        groups = [list(g) for _, g in itertools.groupby(items, key=lambda it: pipeline_of(*jobs[it[0]][1:]))]
        batches, todo = plan_batches(groups, s.batch_size, made)
        reused = len(batches) - len(todo)
        for batch in tqdm(todo, desc="sample", unit="batch"):
            prompts = [config.fill(jobs[j][0], c) for j, _ in batch]
            seeds = [seed for _, seed in batch]
            pipe = pipelines[pipeline_of(*jobs[batch[0][0]][1:])]
            if jobs[batch[0][0]][1] is None:
                images = generate(pipe, prompts, seeds, **common)
            else:
                images = generate(pipe, prompts, seeds, control_image=[pose_maps[jobs[j][1]] for j, _ in batch],
                                  conditioning_scale=s.conditioning_scale,
                                  control_guidance=(s.control_guidance_start, s.control_guidance_end), **common)  # fmt: skip
            for it, image in zip(batch, images, strict=True):
                image_cache.store(cache, f"{it[0]:03d}_s{it[1]}", image)
                made[it] = image
            outputs.failpoint("sample:batch")
        for j, (template, pose_name, kind) in enumerate(jobs):
            prompt = config.fill(template, c)
            images = [made[(j, seed)] for seed in s.seeds]
            for seed, image in zip(s.seeds, images, strict=True):
                file = f"images/{j:03d}_{kind}_{pose_name or 'free'}_s{seed}.png"
                image.save(tmp / file)
                # negative_prompt null, not "", when there is none: see generate_class_priors' manifest.
                index.append({
                    "file": file, "kind": kind, "prompt": prompt, "prompt_template": template, "negative_prompt": s.negative_prompt or None,
                    "pose": pose_name, "pose_file": s.poses[list(poses).index(pose_name)] if pose_name else None,
                    "pose_keypoints": f"poses/{pose_name}.json" if pose_name else None,
                    "seed": seed, "steps": s.steps, "guidance_scale": s.guidance_scale, "scheduler": s.scheduler,
                    "conditioning_scale": s.conditioning_scale if pose_name else None,
                })  # fmt: skip
            rows.append((f"{prompt} | {'pose: ' + pose_name if pose_name else 'no pose'}{KIND_LABELS[kind]}",
                         [pose_maps[pose_name] if pose_name else None, *images]))  # fmt: skip
        outputs.write_json(tmp / "index.json", {
            "base_model": c.model, "stage1": args.stage1, "stage2": args.stage2, "identifier": c.identifier,
            "class_noun": c.class_noun, "resolution": c.resolution, "images": index,
        })  # fmt: skip
    sheet = contact_sheet(rows, ["target pose"] + [f"seed {x}" for x in s.seeds])
    outputs.save_image(args.grid, sheet)
    shutil.rmtree(cache, ignore_errors=True)
    log.info("wrote %d image(s) to %s and the contact sheet to %s; %d of %d batch(es) were made before an "
             "interruption", len(index), args.out, args.grid, reused, len(batches))  # fmt: skip


if __name__ == "__main__":
    outputs.run_stage(main)
