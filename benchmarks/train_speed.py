"""Stage-1 training speed and peak memory on the embedded model, and what the memory-saving options cost.

Variants (same model, resolution, batch, prior preservation and steps):

- ``posebooth``: the stage's loop: VAE latents and prompt embeddings encoded once, before the loop;
- ``encode_every_step``: a plain loop that runs the VAE encoder on the batch's pixels and the text encoder
  on its prompts at every step (what many training scripts do);
- ``gradient_checkpointing``, ``adamw_8bit``, ``bf16``: posebooth's loop with that option on;
- ``checkpointing_8bit``: both savers of the 16 GB SDXL profile (profiles/sdxl.yaml) together.

``--model embedded:tiny-sdxl`` measures the same on the tiny SDXL-architecture model (both text encoders,
pooled embedding and time ids, as stage 1 feeds SDXL).

Each variant runs in its own process (``ru_maxrss`` only grows within a process), the variants are
interleaved, each is repeated, and the medians are printed with ratios to ``posebooth``, measured in
the same run. Usage: ``python benchmarks/train_speed.py [--steps 40] [--repeats 3] [--resolution 64] [--model M]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["posebooth", "encode_every_step", "gradient_checkpointing", "adamw_8bit", "checkpointing_8bit", "bf16"]


def worker(variant: str, steps: int, resolution: int, batch: int, warmup: int, model: str) -> dict:
    """Train ``warmup + steps`` LoRA steps the way ``variant`` says; return steps/s and peak RSS."""
    import copy

    import torch
    import yaml

    from posebooth import config, data, methods, training
    from posebooth.diffusion import add_noise
    from posebooth.models import added_conditions, encode_images, encode_text, load_components

    torch.manual_seed(0)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(params["train"]) | {
        "batch_size": batch,
        "steps": warmup + steps,
        "lr_warmup_steps": 0,
        "gradient_checkpointing": variant in ("gradient_checkpointing", "checkpointing_8bit"),
        "optimizer": "adamw_8bit" if variant in ("adamw_8bit", "checkpointing_8bit") else "adamw",
    }
    t = config.build_section("train", raw)
    precision = "bf16" if variant == "bf16" else "fp32"
    photos = torch.stack([p for p in _photos(data, resolution)])  # (N, 3, R, R) in [-1, 1]
    class_pixels = photos.flip(-1)  # stand-ins for class images: same count and size
    comp = load_components(model, "cpu", precision)
    tr = methods.setup("lora", comp, t, "sks", "robot")
    accelerator, (unet,), optimizer, lr_scheduler = training.prepare([comp.unet], tr.groups, t, "cpu", precision)
    prompts = ["a photo of sks robot", "a photo of a robot"]
    generator = torch.Generator().manual_seed(0)
    cached = variant != "encode_every_step"
    if cached:  # the stage: once, before the loop
        with torch.no_grad():
            latents_all = encode_images(comp.vae, photos)
            class_latents = encode_images(comp.vae, class_pixels)
            emb, pooled_all = encode_text(comp, prompts)  # pooled: SDXL only
    time_ids = data.generated_time_ids(2 * batch, resolution)  # SDXL only
    unet.train()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        idx = training.sample_indices(len(photos), batch, generator)
        cidx = training.sample_indices(len(class_pixels), batch, generator)
        if cached:
            latents = torch.cat([latents_all[idx], class_latents[cidx]])
            hidden = torch.cat([emb[:1].expand(batch, -1, -1), emb[1:].expand(batch, -1, -1)])
            pooled = (
                torch.cat([pooled_all[:1].expand(batch, -1), pooled_all[1:].expand(batch, -1)]) if comp.xl else None
            )
        else:  # a plain loop: encode the batch's pixels and prompts now
            with torch.no_grad():
                latents = encode_images(comp.vae, torch.cat([photos[idx], class_pixels[cidx]]))
                hidden, pooled = encode_text(comp, [prompts[0]] * batch + [prompts[1]] * batch)
        noisy, noise, timesteps = add_noise(comp.noise_scheduler, latents, generator)
        with accelerator.autocast():
            pred = unet(noisy, timesteps, hidden, **added_conditions(pooled, time_ids)).sample
        training.loss_and_step(accelerator, comp.noise_scheduler, pred, latents, noise, timesteps, True, t,
                               tr.params, optimizer, lr_scheduler)  # fmt: skip
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "steps_per_s": steps / elapsed, "peak_mb": peak_mb}


def _photos(data, resolution: int):
    import tempfile

    from posebooth.prepare import prepare_folder, write_prepared

    kept, skipped = prepare_folder(str(ROOT / "data" / "subject"), resolution, 16, "centre", (127, 127, 127))
    with tempfile.TemporaryDirectory() as tmp:
        write_prepared(Path(tmp), kept, skipped)
        _, pixels = data.instance_images(tmp, resolution)
    return pixels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--model", default="embedded:tiny-sd15", help="embedded:tiny-sd15 or embedded:tiny-sdxl")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.resolution, args.batch, args.warmup, args.model)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.repeats):
        for variant in args.variants:  # interleaved, so drifting machine load hits every variant alike
            cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--resolution", str(args.resolution), "--batch", str(args.batch),
                   "--model", args.model]  # fmt: skip
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(f"repeat {r + 1}/{args.repeats} {variant}: {runs[variant][-1]['steps_per_s']:.2f} steps/s, "
                  f"peak {runs[variant][-1]['peak_mb']:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in ("steps_per_s", "peak_mb")} for v in runs}
    base = med.get("posebooth")
    print(f"\nstage-1 LoRA training, {args.model}, {args.resolution} px, batch {args.batch} + {args.batch} class "
          f"images, {args.steps} timed steps, median of {args.repeats} interleaved runs (own process each)\n")  # fmt: skip
    print("| variant | steps/s | peak RSS (MB) | speed vs posebooth | peak vs posebooth |")
    print("|---|---:|---:|---:|---:|")
    for v, m in med.items():
        speed = f"{m['steps_per_s'] / base['steps_per_s']:.2f}x" if base else "-"
        peak = f"{m['peak_mb'] / base['peak_mb']:.2f}x" if base else "-"
        print(f"| {v} | {m['steps_per_s']:.2f} | {m['peak_mb']:.0f} | {speed} | {peak} |")
    if base and "encode_every_step" in med:
        plain = med["encode_every_step"]
        print(f"\nposebooth vs encode-every-step: {base['steps_per_s'] / plain['steps_per_s']:.2f}x the speed "
              f"(target >= 1.25x), {base['peak_mb'] / plain['peak_mb']:.3f}x the peak memory (target <= 1.00x)")  # fmt: skip


if __name__ == "__main__":
    main()
