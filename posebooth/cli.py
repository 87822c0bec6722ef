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
    """``--num-images`` images of the trained subject (seeds ``--seed``, ``--seed`` + 1, ...) in batches of
    ``--batch-size``, at ``--width`` x ``--height``; stage 2's ControlNet is loaded only with a pose."""
    from posebooth import subject
    from posebooth.generation import chunks, generate
    from posebooth.models import SCHEDULER_CLASSES, load_components

    cfg = config.load(["common", "sample", "extract_poses"], args.params)
    c, s = cfg.common, cfg.sample
    scheduler = args.scheduler or s.scheduler
    if scheduler not in SCHEDULER_CLASSES:
        raise ValueError(f"--scheduler: {scheduler!r} is not one of {sorted(SCHEDULER_CLASSES)}")
    width, height = args.width or c.resolution, args.height or c.resolution
    control, tag = _control_image(args, cfg, width, height)  # validated before any model loads; None: no pose
    for folder in (args.stage1, args.stage2) if control is not None else (args.stage1,):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no trained adapters; run `dvc repro` (or `make repro`) first")
    prompt = config.fill(args.prompt, c)
    comp = load_components(
        subject.base_model(args.stage1, c.model), c.device, c.precision, c.vae, c.model_config
    )  # full: stage 1's own
    extras = list(zip(s.extra_loras, s.extra_lora_weights, strict=True))
    lora_scale = s.subject_lora_scale if args.lora_scale is None else args.lora_scale
    posed, free = subject.trained_pipelines(comp, args.stage1, args.stage2, scheduler, c.device, c.precision,
                                    args.cpu_offload, lora_scale, extras, with_controlnet=control is not None)  # fmt: skip
    pipe = free if control is None else posed
    pipe.set_progress_bar_config(disable=None, leave=False, desc="denoising")  # per step, on a terminal only
    kwargs = dict(
        steps=args.steps or s.steps,
        guidance_scale=s.guidance_scale if args.guidance is None else args.guidance,
        resolution=c.resolution,
        width=width,
        height=height,
        negative_prompt=s.negative_prompt if args.negative_prompt is None else args.negative_prompt,
    )
    if control is not None:
        scale = s.conditioning_scale if args.conditioning_scale is None else args.conditioning_scale
        kwargs |= dict(control_image=control, conditioning_scale=scale,
                       control_guidance=(s.control_guidance_start, s.control_guidance_end))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60]
    seeds = [args.seed + i for i in range(args.num_images)]
    # --batch-size images per pipeline call (all --num-images at once would not fit a GPU). Each image has
    # its own seeded generator (generation.generate), so it depends on its seed, not on its batch.
    with tqdm(total=len(seeds), desc="generate", unit="image") as bar:
        for batch in chunks(seeds, args.batch_size or s.batch_size):
            for seed, image in zip(batch, generate(pipe, prompt, batch, **kwargs), strict=True):
                path = out / f"{slug}{tag}_s{seed}.png"
                image.save(path)  # as each batch finishes: a stopped run keeps what it made
                tqdm.write(str(path))
            bar.update(len(batch))


def _control_image(args: argparse.Namespace, cfg: config.Config, width: int, height: int):
    """``(control image, file-name tag)`` for ``--pose`` or ``--pose-map``; ``(None, "")`` without either.

    ``--pose`` is read as an entry of ``sample.poses`` is (a keypoint .json, or a photo read by
    ``extract_poses.detector``, optionally ``#mirror`` and/or ``#scale=F``) and drawn like sample's pose maps,
    letterboxed into ``width`` x ``height``. ``--pose-map`` is a ready ControlNet input (an OpenPose map: sticks
    on black, RGB) used as it is; the pipeline resizes it to ``width`` x ``height``.
    """
    from PIL import Image

    from posebooth import poses

    if args.pose_map:
        try:
            with Image.open(args.pose_map) as im:
                image = im.convert("RGB")
        except OSError as err:
            raise ValueError(f"--pose-map {args.pose_map}: cannot be read as an image ({err})") from err
        if abs(image.width / image.height - width / height) > 0.01:
            log.warning("--pose-map: its %dx%d are stretched to %dx%d; give --width and --height its proportions",
                        image.width, image.height, width, height)  # fmt: skip
        return image, "_" + Path(args.pose_map).stem
    if not args.pose:
        return None, ""
    path, mirror, scale = poses.parse_pose_entry(args.pose)
    pose = _detect_pose(path, cfg, None) if path.suffix.lower() in poses.IMAGE_SUFFIXES else poses.load_pose(path)
    if mirror:
        pose = poses.mirror_pose(pose)
    if scale != 1.0:
        pose = poses.scale_pose(pose, scale)
    image = poses.render_pose_size(pose, width, height, cfg.extract_poses.render_size)
    return image, "_" + poses.entry_name(path, mirror, scale)


def _detect_pose(image_path: Path, cfg: config.Config, detector: str | None):
    """The pose that ``detector`` (default: extract_poses.detector) reads in a photo."""
    from dataclasses import replace

    from posebooth import poses
    from posebooth.detectors import make_detector

    e = replace(cfg.extract_poses, detector=detector or cfg.extract_poses.detector)
    if e.detector == "sidecar":
        raise ValueError(
            f"{image_path}: reading a pose from a photo needs --detector openpose, dwpose or world (posebooth pose), "
            "or extract_poses.detector set to one of them; `posebooth generate --pose-map` takes a drawn pose map"
        )
    return poses.pose_from_image(image_path, make_detector(e.detector, e, cfg.common.device).detect, "the pose photo")


def _pose(args: argparse.Namespace) -> None:
    """A keypoint file from a reference image (through a detector) or from a keypoint file, optionally
    mirrored and rescaled: a target pose to edit and put in data/target_poses/."""
    from posebooth.poses import IMAGE_SUFFIXES, load_pose, mirror_pose, scale_pose

    source = Path(args.source)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        pose = _detect_pose(source, config.load(["common", "extract_poses"], args.params), args.detector)
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
    """params.yaml = the defaults (profiles/defaults.yaml) with the named profiles applied in order; keys the
    defaults do not list (the subject, photos, prompts, poses, seeds, ...) keep the values they have."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: params.yaml keeps its comments and layout
    yaml.preserve_quotes = True  # vae: "" stays "" rather than ''
    yaml.width = 4096  # long lines stay as they are
    yaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's list layout
    params = yaml.load(Path(args.params))
    columns = {section: _comment_column(values) for section, values in params.items()}
    layers = [(source, yaml.load(source)) for source in map(_profile_path, ["defaults", *args.profiles])]
    before = {(section, key): params[section][key] for _, layer in layers for section, values in layer.items()
              for key in values if section in params and key in params[section]}  # fmt: skip
    for source, layer in layers:
        for section, values in layer.items():
            if section not in params:
                raise ValueError(f"{source}: section {section!r} is not in {args.params}")
            for key, value in values.items():
                if key not in params[section]:
                    raise ValueError(f"{source}: {section}.{key} is not a key of {args.params}")
                if params[section][key] != value:  # an unchanged value keeps its spelling
                    params[section][key] = value
                    _align_comment(yaml, params[section], key, columns[section])
    tmp = Path(args.params).with_suffix(".tmp.yaml")
    yaml.dump(params, tmp)
    try:
        config.load(config.SECTIONS, tmp)  # the result must load strictly before it replaces params.yaml
    except config.ConfigError:
        tmp.unlink()
        raise
    tmp.replace(args.params)
    changed = [f"{section}.{key}" for (section, key), old in before.items() if params[section][key] != old]
    kept = [f"{section}.{key}" for _, layer in layers[1:] for section, values in layer.items() for key in values
            if key not in layers[0][1].get(section, {})]  # fmt: skip
    print(f"applied the defaults and {', '.join(args.profiles)} to {args.params}: {len(changed)} value(s) changed "
          f"{changed}; review with `git diff {args.params}`")  # fmt: skip
    if kept:
        print(f"not in profiles/defaults.yaml, so a later use-profile keeps them: {kept}")


def _comment_column(section) -> int:
    """The column at which most end-of-line comments of a params.yaml section start (0 if none)."""
    columns = [c[2].column for c in section.ca.items.values() if len(c) > 2 and c[2] is not None]
    return max(set(columns), key=columns.count) if columns else 0


def _align_comment(yaml, section, key: str, column: int) -> None:
    """Put the end-of-line comment of a changed value where params.yaml's layout has it: at the section's
    ``column``, or two spaces after a longer value (ruamel would leave it where the previous value pushed it,
    so a switch and a switch back would not give the file back)."""
    import io

    token = (section.ca.items.get(key) or [None] * 3)[2]
    if token is None:
        return
    text = io.StringIO()
    yaml.dump({key: section[key]}, text)
    token.column = max(column, 2 + len(text.getvalue().splitlines()[0]) + 2)  # 2: the section's indentation


def _profile_path(name: str) -> Path:
    """profiles/NAME.yaml, or NAME itself when it is a path to a .yaml file."""
    source = Path(name) if name.endswith(".yaml") else PROFILES / f"{name}.yaml"
    if not source.exists():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise FileNotFoundError(f"profile {name!r} not found; known profiles: {known}")
    return source


def _export(args: argparse.Namespace) -> None:
    """The files AUTOMATIC1111/Forge and ComfyUI load (posebooth/exports.py), from the trained models and the
    params recorded with them (models/stage1/provenance.json), not from params.yaml."""
    from posebooth import exports

    stage2 = Path(args.stage2) if Path(args.stage2).is_dir() else None
    for path in exports.write_all(Path(args.stage1), stage2, Path(args.out), args.full_diff):
        print(path)


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
    pose = g.add_mutually_exclusive_group()
    pose.add_argument("--pose", help="the target pose as in sample.poses: a keypoint .json, or a photo read by "
                      "extract_poses.detector, optionally #mirror and/or #scale=F; neither: no ControlNet")  # fmt: skip
    pose.add_argument("--pose-map", help="a drawn OpenPose map (an image, sticks on black) used as it is")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=None, help="images per pipeline call; default: sample.batch_size")
    g.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8; default: common.resolution")
    g.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8; default: common.resolution")
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
    p = sub.add_parser(
        "use-profile",
        help="params.yaml = the defaults (profiles/defaults.yaml) + the profile(s) (profiles/NAME.yaml)",
        description="Resets every key of profiles/defaults.yaml (model, VAE, resolution, device, precision, step "
        "counts, learning rates, batch sizes, ranks, optimizers, memory savers, ControlNets, evaluation models) to "
        "the embedded default, then applies the named profiles in order. The other keys (your subject, photos, "
        "prompts, target poses, seeds, and every key no profile sets) keep your values.",
    )
    p.add_argument("profiles", nargs="+", metavar="profile",
                   help="sd15, sdxl, tiny_sdxl, live_subject, test, defaults, or a path to a .yaml file")  # fmt: skip
    p.set_defaults(func=_use_profile)
    e = sub.add_parser("export", help="single files for AUTOMATIC1111/Forge and ComfyUI (see the README's table)")
    e.add_argument("--stage1", default="models/stage1")
    e.add_argument("--stage2", default="models/stage2", help="skipped when the folder does not exist")
    e.add_argument("--out", default="exports", help="folder to write the files into")
    e.add_argument("--full-diff", action="store_true",
                   help="each LoRA or DoRA also as full weight diffs, <name>_diff.safetensors: exact in every UI "
                        "(a DoRA in AUTOMATIC1111 needs it), as large as the adapted layers")  # fmt: skip
    e.set_defaults(func=_export)
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
    for flag in ("width", "height"):
        if (value := getattr(args, flag, None)) is not None and (value < 8 or value % 8):
            ap.error(f"--{flag}: {value} must be a positive multiple of 8 (the VAE's downsampling factor)")
    outputs.run_stage(lambda: args.func(args), f"posebooth {args.command}")


if __name__ == "__main__":
    main(sys.argv[1:])
