"""The ``posebooth`` command (``python -m posebooth``): generate with trained adapters, switch profiles.

This is an entry point like the stage scripts: it parses arguments and reads ``params.yaml``, then calls
the library.

    posebooth generate "a photo of sks robot on the moon" --pose data/target_poses/t_pose.json --seed 3
    posebooth use-profile sd15
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from tqdm import tqdm

from posebooth import config, outputs

log = logging.getLogger("posebooth")
PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def _generate(args: argparse.Namespace) -> None:
    from posebooth import subject
    from posebooth.generation import chunks, generate
    from posebooth.models import SCHEDULER_CLASSES, load_components
    from posebooth.poses import load_pose, render_pose

    cfg = config.load(["common", "sample", "extract_poses"], args.params)
    c, s = cfg.common, cfg.sample
    scheduler = args.scheduler or s.scheduler
    if scheduler not in SCHEDULER_CLASSES:
        raise ValueError(f"--scheduler: {scheduler!r} is not one of {sorted(SCHEDULER_CLASSES)}")
    pose = load_pose(Path(args.pose)) if args.pose else None  # validated before any model loads
    for folder in (args.stage1, args.stage2):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no trained adapters; run `dvc repro` (or `make repro`) first")
    prompt = config.fill(args.prompt, c)
    comp = load_components(
        subject.base_model(args.stage1, c.model), c.device, c.precision, c.vae
    )  # full: stage 1's own
    extras = list(zip(s.extra_loras, s.extra_lora_weights, strict=True))
    lora_scale = s.subject_lora_scale if args.lora_scale is None else args.lora_scale
    posed, free = subject.trained_pipelines(comp, args.stage1, args.stage2, scheduler, c.device, c.precision,
                                    args.cpu_offload, lora_scale, extras)  # fmt: skip
    seeds = [args.seed + i for i in range(args.num_images)]
    kwargs = dict(
        steps=args.steps or s.steps,
        guidance_scale=s.guidance_scale if args.guidance is None else args.guidance,
        resolution=c.resolution,
        negative_prompt=s.negative_prompt if args.negative_prompt is None else args.negative_prompt,
    )
    if pose is not None:
        scale = s.conditioning_scale if args.conditioning_scale is None else args.conditioning_scale
        kwargs |= dict(control_image=render_pose(pose, c.resolution, cfg.extract_poses.render_size),
                       conditioning_scale=scale, control_guidance=(s.control_guidance_start, s.control_guidance_end))  # fmt: skip
    # --batch-size images per pipeline call (each image has its own seeded generator, so batching does not
    # change them): all --num-images at once would not fit a GPU
    images = []
    for batch in tqdm(list(chunks(seeds, args.batch_size or s.batch_size)), desc="generate", unit="batch"):
        images += generate(free if pose is None else posed, prompt, batch, **kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60]
    for seed, image in zip(seeds, images, strict=True):
        path = out / f"{slug}{'_' + Path(args.pose).stem if args.pose else ''}_s{seed}.png"
        image.save(path)
        print(path)


def _pose(args: argparse.Namespace) -> None:
    """A keypoint file from a reference image (through a detector) or from a keypoint file, optionally
    mirrored and rescaled: a target pose to edit and put in data/target_poses/."""
    from dataclasses import replace

    from posebooth.detectors import make_detector
    from posebooth.poses import IMAGE_SUFFIXES, load_pose, mirror_pose, scale_pose

    source = Path(args.source)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        cfg = config.load(["common", "extract_poses"], args.params)
        e = replace(cfg.extract_poses, detector=args.detector or cfg.extract_poses.detector)
        if e.detector == "sidecar":
            raise ValueError("posebooth pose: reading a pose from an image needs --detector openpose, dwpose or world")
        from PIL import Image

        with Image.open(source) as im:
            pose = make_detector(e.detector, e, cfg.common.device).detect(im.convert("RGB"))
        if pose is None:
            raise ValueError(f"{source}: the {e.detector} detector found no pose in it")
    else:
        pose = load_pose(source)
    if args.mirror:
        pose = mirror_pose(pose)
    if args.scale != 1.0:
        pose = scale_pose(pose, args.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_json(out, pose.to_json())
    print(out)


def _use_profile(args: argparse.Namespace) -> None:
    from ruamel.yaml import YAML

    source = PROFILES / f"{args.profile}.yaml" if not args.profile.endswith(".yaml") else Path(args.profile)
    if not source.exists():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise FileNotFoundError(f"profile {args.profile!r} not found; known profiles: {known}")
    yaml = YAML()  # round trip: params.yaml keeps its comments and layout
    params = yaml.load(Path(args.params))
    profile = yaml.load(source)
    for section, values in profile.items():
        if section not in params:
            raise ValueError(f"{source}: section {section!r} is not in {args.params}")
        for key, value in values.items():
            if key not in params[section]:
                raise ValueError(f"{source}: {section}.{key} is not a key of {args.params}")
            params[section][key] = value
    tmp = Path(args.params).with_suffix(".tmp.yaml")
    yaml.dump(params, tmp)
    try:
        config.load(config.SECTIONS, tmp)  # the result must load strictly before it replaces params.yaml
    except config.ConfigError:
        tmp.unlink()
        raise
    tmp.replace(args.params)
    changed = sum(len(v) for v in profile.values())
    print(f"applied {changed} value(s) from {source} to {args.params}; review with `git diff {args.params}`")


def _world_pretrain(args: argparse.Namespace) -> None:
    """Build the world's models (``make world``): base model, ControlNet and measuring models."""
    from posebooth.world import build

    parts = args.parts.split(",") if args.parts else list(build.PARTS)
    records = build.build(Path(args.out), parts, args.quick)
    for part, record in records.items():
        print(f"world {part} written to {args.out} in {record['seconds'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="posebooth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", default="params.yaml")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="images of the trained subject, optionally in a pose")
    g.add_argument("prompt", help="may use {identifier} and {class_noun}")
    g.add_argument("--pose", help="keypoint JSON of the target pose (OpenPose-18); none: no ControlNet")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=None, help="images per pipeline call; default: sample.batch_size")
    g.add_argument("--negative-prompt", default=None, help="default: sample.negative_prompt")
    g.add_argument("--scheduler", default=None, help="default: sample.scheduler")
    g.add_argument("--steps", type=int, default=None, help="default: sample.steps")
    g.add_argument("--guidance", type=float, default=None, help="default: sample.guidance_scale")
    g.add_argument("--conditioning-scale", type=float, default=None, help="default: sample.conditioning_scale")
    g.add_argument("--lora-scale", type=float, default=None, help="default: sample.subject_lora_scale")
    g.add_argument("--cpu-offload", action="store_true", help="model CPU offload (cuda)")
    g.add_argument("--stage1", default="models/stage1")
    g.add_argument("--stage2", default="models/stage2")
    g.add_argument("--out", default="generated")
    g.set_defaults(func=_generate)
    q = sub.add_parser("pose", help="a target-pose keypoint file from a reference image or a keypoint file")
    q.add_argument("source", help="an image (read with the detector) or a keypoint .json")
    q.add_argument(
        "--detector", choices=["openpose", "dwpose", "world"], default=None, help="default: extract_poses.detector"
    )
    q.add_argument("--mirror", action="store_true", help="mirror left to right (left and right keypoints swap)")
    q.add_argument("--scale", type=float, default=1.0, help="scale about the pose's centre")
    q.add_argument("--out", required=True, help="the keypoint .json to write, e.g. data/target_poses/mine.json")
    q.set_defaults(func=_pose)
    p = sub.add_parser("use-profile", help="write a profile's values (profiles/NAME.yaml) into params.yaml")
    p.add_argument("profile", help="sd15, test, or a path to a .yaml file")
    p.set_defaults(func=_use_profile)
    w = sub.add_parser("world", help="the procedural world the embedded default model is pretrained on")
    wsub = w.add_subparsers(dest="world_command", required=True)
    wp = wsub.add_parser("pretrain", help="build the world's base model, ControlNet and measuring models (make world)")
    wp.add_argument("--out", default="world", help="folder of the committed world weights")
    wp.add_argument("--quick", action="store_true", help="a few steps of each part, to check the code")
    wp.add_argument("--parts", default="", help="comma-separated: base,controlnet,clip,dino,pose (default: all)")
    wp.set_defaults(func=_world_pretrain)
    args = ap.parse_args(argv)
    counts = [getattr(args, "num_images", 1), getattr(args, "steps", None) or 1, getattr(args, "batch_size", None) or 1]
    if min(counts) < 1:
        ap.error("--num-images, --batch-size and --steps must be at least 1")
    outputs.run_stage(lambda: args.func(args), f"posebooth {args.command}")


if __name__ == "__main__":
    main(sys.argv[1:])
