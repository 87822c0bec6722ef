"""Class-prior generation speed on the embedded model: batched (``generate_class_priors.batch_size``)
against one image at a time, same pipeline (loaded once), prompt, seeds, steps and guidance.

The two ways alternate within one process (generation holds no growing state); each is repeated and
the medians are printed with their ratio. Batching does not change the images: each image has its own
seeded generator, and the script checks that the batched and one-at-a-time images match within
floating-point noise. Usage: ``python benchmarks/class_priors_speed.py [--images 8] [--batch 8]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None, help="default: generate_class_priors.batch_size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=None, help="default: common.resolution")
    args = ap.parse_args()

    from posebooth.generation import chunks, generate
    from posebooth.models import load_components, sd_pipeline

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    c, g = params["common"], params["generate_class_priors"]
    batch = args.batch or g["batch_size"]
    resolution = args.resolution or c["resolution"]
    pipe = sd_pipeline(load_components(c["model"], "cpu", "fp32"), g["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    prompt = c["class_prompt"].format(class_noun=c["class_noun"])
    seeds = list(range(args.images))
    common = dict(steps=g["steps"], guidance_scale=g["guidance_scale"], resolution=resolution,
                  negative_prompt=g["negative_prompt"])  # fmt: skip

    def batched():
        return [im for b in chunks(seeds, batch) for im in generate(pipe, prompt, b, **common)]

    def one_at_a_time():
        return [generate(pipe, prompt, [s], **common)[0] for s in seeds]

    generate(pipe, prompt, seeds[:1], **common)  # warm-up
    times: dict[str, list[float]] = {"batched": [], "one at a time": []}
    images = {}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("one at a time", one_at_a_time)):
            start = time.perf_counter()
            images[name] = fn()
            times[name].append(time.perf_counter() - start)
    diff = max(
        np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        for a, b in zip(images["batched"], images["one at a time"], strict=True)
    )
    rate = {k: args.images / statistics.median(v) for k, v in times.items()}
    print(f"\nclass priors: {args.images} images of {prompt!r}, {resolution} px, {g['steps']} steps, "
          f"{c['model']}, median of {args.repeats} alternating runs\n")  # fmt: skip
    print("| way | images/s |")
    print("|---|---:|")
    print(f"| batched ({batch} per batch) | {rate['batched']:.2f} |")
    print(f"| one at a time | {rate['one at a time']:.2f} |")
    print(f"\nbatched vs one at a time: {rate['batched'] / rate['one at a time']:.2f}x (target >= 2x); "
          f"largest pixel difference between the two ways: {diff} of 255")  # fmt: skip


if __name__ == "__main__":
    main()
