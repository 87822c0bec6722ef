"""One GPU check for when a CUDA GPU is at hand: offline, in under 8 minutes on one GPU, it runs

1. the embedded pipeline (``dvc repro`` in a fresh copy of the repository with the test profile's sizes,
   profiles/test.yaml) on ``cuda`` in fp16 and in bf16, with flips (``train.flip_prob`` > 0), validation
   images, stage 2, sampling and evaluation: passed or failed (with the error line), seconds, and whether
   the final stage-1 loss in metrics/train_stage1_appearance.json is finite;
2. stage-1 LoRA training speed, 512 px, fp16, prior preservation on, on a full-size Stable Diffusion 1.5
   architecture with random weights built from the published configs in ``benchmarks/sd15_configs/``:
   posebooth's loop (latents and prompt embeddings cached, as in stages/train_stage1_appearance.py) against
   diffusers' ``train_dreambooth_lora.py``, run for real when ``--diffusers-script PATH`` names it (it is
   not in the diffusers wheel; take it from the diffusers release you have installed), or else against an
   in-repo stand-in that does per step what that script does (VAE encode of the batch, text encoding, LoRA
   r4 on to_q/k/v/out.0, AdamW), labelled as the stand-in in the table;
3. one markdown table at the end; the exit status is 1 when any check failed.

Each check runs in its own process group, so one failure (or hang) does not stop the others, under its own
timeout within an overall budget (``--budget``, 7.5 minutes); the pipeline runs and the model build run at the
same time, each speed check alone. Steps/s come from the times at which
``accelerate.Accelerator.backward`` returns (all three loops call it once per step; each calls ``.item()``
on the loss every step), after the warm-up steps; peak GPU memory is ``torch.cuda.max_memory_allocated``
in that check's process at its last step.

``--dry-run`` runs the same code paths on CPU, in about three minutes on 2 cores: fp32 and bf16 pipelines; the
committed configs checked on the meta device against the published parameter counts, then built with tiny
sizes for the speed checks (64 px, bf16, 2 timed steps). It keeps the script from rotting; its figures
measure nothing.

Usage: ``python benchmarks/gpu_check.py [--diffusers-script train_dreambooth_lora.py] [--budget 450]
[--checks NAME ...] [--logs DIR]``, or ``python benchmarks/gpu_check.py --dry-run``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.workspace import copy_repository, git_init, remove_outputs  # noqa: E402  (the tests' copy of the working tree)

CONFIGS = ROOT / "benchmarks" / "sd15_configs"
CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
# The class each part of the pipeline folder must have (model_index.json names them).
SD15_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "CLIPTokenizer",
    "scheduler": "PNDMScheduler",
}
# SD 1.5's published parameter counts (also asserted, as literals, by tests/test_benchmarks.py).
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
# Dry run: the committed configs with these values changed (an 8x VAE, a 4-level UNet, a few MB in all).
TINY = {
    "unet": {
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "sample_size": 8,
    },
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64},
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
    },
}
# Dry run: fewer samples than the test profile (one prompt and one target pose; two seeds, for LPIPS diversity).
DRY_PIPELINE = {
    "sample": {
        "prompts": ["a {identifier} {class_noun} in the snow"],
        "pose_prompts": ["a photo of {identifier} {class_noun}"],
        "poses": ["data/target_poses/standing.json"],
    },
}
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks robot", "a photo of a robot"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # accelerate's and diffusers' scripts' names
# Seconds each check may take at most (each pipeline run: "pipeline"); the longest of those that run at the same
# time (see waves) plus the speed checks' fit the default budget, so none starves the others.
CAPS = {"pipeline": 200, "sd15-model": 90, "speed-posebooth": 90, "speed-diffusers": 110, "speed-reference": 90}
DRY_CAPS = {"pipeline": 240, "sd15-model": 120, "speed-posebooth": 120, "speed-diffusers": 150, "speed-reference": 120}


@dataclass(frozen=True)
class Settings:
    """What the checks run with: the GPU run's sizes, or the dry run's tiny ones on CPU."""

    device: str
    pipeline_precisions: tuple[str, ...]
    speed_precision: str
    resolution: int
    batch: int  # instance images per step, plus as many class images
    warmup: int
    steps: int  # timed steps after the warm-up
    tiny: bool  # the SD 1.5 configs with TINY's values (dry run)


def settings(args: argparse.Namespace) -> Settings:
    """The GPU run's settings from the command line, or the dry run's fixed tiny ones."""
    if args.dry_run:
        return Settings("cpu", ("fp32", "bf16"), "bf16", 64, 1, 1, 2, True)
    return Settings("cuda", ("fp16", "bf16"), "fp16", args.resolution, args.batch, args.warmup, args.steps, False)


def checks(s: Settings, diffusers_script: Path | None) -> dict[str, str]:
    """Check name -> its label in the table, in the order they run."""
    where = f"{s.device}, {s.resolution} px, {s.speed_precision}, batch {s.batch} + {s.batch} class"
    model = "SD 1.5 configs with tiny sizes" if s.tiny else "full-size SD 1.5, random weights"
    found = {
        f"pipeline-{p}": f"pipeline on {s.device} in {p} (`dvc repro`, test profile)" for p in s.pipeline_precisions
    }
    found["sd15-model"] = f"{model} from benchmarks/sd15_configs/"
    found["speed-posebooth"] = f"stage-1 speed: posebooth's loop ({where})"
    if diffusers_script:
        found["speed-diffusers"] = f"stage-1 speed: diffusers' {diffusers_script.name} ({where})"
    else:
        found["speed-reference"] = (
            f"stage-1 speed: STAND-IN for train_dreambooth_lora.py, an in-repo loop encoding "
            f"images and prompts every step ({where})"
        )
    return found


# ---------------------------------------------------------------------------------------------------------
# The full-size SD 1.5 architecture from its published configs


def load_configs(folder: Path = CONFIGS) -> dict[str, dict]:
    """The committed SD 1.5 configs by part: model_index, unet, vae, text_encoder, scheduler."""
    return {part: json.loads((folder / name).read_text()) for part, name in CONFIG_FILES.items()}


def model_index_problems(configs: dict[str, dict]) -> list[str]:
    """What in model_index.json and the configs' ``_class_name`` differs from the classes built here."""
    problems = []
    for part, cls in SD15_CLASSES.items():
        listed = configs["model_index"].get(part, [None, None])[1]
        if listed != cls:
            problems.append(f"model_index.json: {part} is {listed}, expected {cls}")
    for part in ("unet", "vae", "scheduler"):
        if configs[part].get("_class_name") != SD15_CLASSES[part]:
            problems.append(f"{CONFIG_FILES[part]}: _class_name is {configs[part].get('_class_name')}")
    if configs["text_encoder"].get("architectures") != [SD15_CLASSES["text_encoder"]]:
        problems.append(
            f"{CONFIG_FILES['text_encoder']}: architectures is {configs['text_encoder'].get('architectures')}"
        )
    return problems


def sd15_modules(configs: dict[str, dict], overrides: dict[str, dict] | None = None) -> dict:
    """UNet, VAE and text encoder of SD 1.5's architecture from ``configs`` (with ``overrides`` per part),
    randomly initialised; under ``accelerate.init_empty_weights()`` on the meta device, allocating nothing."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    o = overrides or {}
    return {
        "unet": UNet2DConditionModel.from_config(configs["unet"] | o.get("unet", {})),
        "vae": AutoencoderKL.from_config(configs["vae"] | o.get("vae", {})),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"] | o.get("text_encoder", {}))),
    }


def parameter_counts(modules: dict) -> dict[str, int]:
    """Number of parameters of each module."""
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def save_sd15(out: Path, modules: dict, scheduler_config: dict, dtype) -> None:
    """A diffusers pipeline folder (no safety checker) of ``modules`` in ``dtype``, with the real CLIP tokenizer
    (posebooth.embedded builds it offline) and SD 1.5's scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from posebooth.embedded import clip_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(vocab=f"{tmp}/vocab.json", merges=f"{tmp}/merges.txt", model_max_length=77)
    pipe = StableDiffusionPipeline(
        **{name: m.to(dtype) for name, m in modules.items()},
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def sd15_check(out: Path, s: Settings) -> dict:
    """Check the committed configs (classes, and the published parameter counts on the meta device), then build
    the model (full size on the GPU in fp16, or with tiny sizes on CPU) and save it to ``out``."""
    import torch
    from accelerate import init_empty_weights

    configs = load_configs()
    with init_empty_weights():
        counts = parameter_counts(sd15_modules(configs))
    problems = model_index_problems(configs) + [
        f"{part}: {counts[part]:,} parameters, published {n:,}" for part, n in SD15_PARAMS.items() if counts[part] != n
    ]
    if problems:
        return {"ok": False, "error": "; ".join(problems)}
    torch.manual_seed(0)
    with torch.device(s.device):  # random initialisation where the model will run: seconds on a GPU
        modules = sd15_modules(configs, TINY if s.tiny else None)
    dtype = torch.float16 if s.device == "cuda" else torch.float32
    save_sd15(out, modules, configs["scheduler"], dtype)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**30
    device = torch.cuda.get_device_name() if s.device == "cuda" else "CPU"
    built = "built with tiny sizes" if s.tiny else "built"
    return {
        "ok": True,
        "detail": f"UNet {counts['unet']:,}, VAE {counts['vae']:,}, text encoder "
        f"{counts['text_encoder']:,} parameters as published; {built} on {device}, saved in {str(dtype)[6:]} "
        f"({size:.2f} GiB)",
    }


# ---------------------------------------------------------------------------------------------------------
# Stage-1 training speed: posebooth's loop, diffusers' script or its stand-in


class StepClock:
    """The time at which each ``accelerate.Accelerator.backward`` in this process returns (once per step in
    every loop timed here, diffusers' script included), the peak GPU memory allocated by then, the last loss."""

    def __init__(self, device: str):
        import accelerate
        import torch

        self.times: list[float] = []
        self.peak: int | None = None
        self.loss = None
        original = accelerate.Accelerator.backward

        def backward(accelerator, loss, **kwargs):
            original(accelerator, loss, **kwargs)
            self.times.append(time.perf_counter())
            self.loss = loss.detach()  # read at the end: no extra synchronisation per step
            if device == "cuda":
                self.peak = torch.cuda.max_memory_allocated()

        accelerate.Accelerator.backward = backward

    def result(self, warmup: int) -> dict:
        """Steps/s after ``warmup`` steps, peak GPU memory (GiB) and the final loss, as a check's result."""
        timed = len(self.times) - warmup
        if warmup < 1 or timed < 1:
            return {"ok": False, "error": f"{len(self.times)} training steps ran; need more than {warmup} (warm-up)"}
        loss = float(self.loss) if self.loss is not None else math.nan
        finite = "" if math.isfinite(loss) else " (not finite: random weights)"
        return {
            "ok": True,
            "steps_per_s": timed / (self.times[-1] - self.times[warmup - 1]),
            "peak_gib": self.peak / 2**30 if self.peak is not None else None,
            "detail": f"{timed} timed steps after {warmup} warm-up; final loss {loss:.4g}{finite}",
        }


def training_photos(work: Path, resolution: int) -> Path:
    """The sample subject's photos prepared at ``resolution`` once per run: ``prepared/`` (as prepare_images
    writes them) for posebooth, and plain image folders for train_dreambooth_lora.py: ``instance/`` and
    ``class/`` (the photos mirrored, stand-ins for class images as in benchmarks/train_speed.py)."""
    from PIL import Image

    from posebooth.prepare import prepare_folder, write_prepared

    folder = work / f"photos-{resolution}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    kept, skipped = prepare_folder(str(ROOT / "data" / "subject"), resolution, 16, "centre", (127, 127, 127))
    write_prepared(folder / "prepared", kept, skipped)
    for sub in ("instance", "class"):
        (folder / sub).mkdir()
    for item in kept:
        item.image.save(folder / "instance" / f"{item.name}.png")
        item.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "class" / f"{item.name}.png")
    (folder / ".complete").touch()
    return folder


def posebooth_speed(model: Path, photos: Path, s: Settings) -> dict:
    """posebooth's stage-1 LoRA loop as stages/train_stage1_appearance.py runs it (and benchmarks/train_speed.py
    times it): the VAE posteriors of the photos and their mirror images, and the prompt embeddings, encoded once
    before the loop; each step flips, draws latents from the cached posteriors, noises, predicts, and steps
    AdamW on the LoRA."""
    import torch

    from posebooth import config, data, methods, training
    from posebooth.diffusion import add_noise
    from posebooth.models import encode_posterior, encode_text, load_components

    clock = StepClock(s.device)
    torch.manual_seed(0)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["train"] | {
        "method": "lora",
        "batch_size": s.batch,
        "steps": s.warmup + s.steps,
        "lr": 5e-4,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "rank": 4,
        "alpha": 4.0,
        "target_modules": LORA_TARGETS,
        "flip_prob": 0.5,
        "prior_loss_weight": 1.0,
        "optimizer": "adamw",
        "gradient_checkpointing": False,
    }
    t = config.build_section("train", raw)
    _, pixels = data.instance_images(photos / "prepared", s.resolution)  # (N, 3, R, R) in [-1, 1]
    comp = load_components(str(model), s.device, s.speed_precision)
    tr = methods.setup("lora", comp, t, "sks", "robot")
    accelerator, (unet,), optimizer, lr_scheduler = training.prepare(
        [comp.unet], tr.groups, t, s.device, s.speed_precision
    )
    with torch.no_grad():  # the stage: once, before the loop
        posteriors = encode_posterior(comp.vae, pixels, t.vae_batch_size)  # mean and std, (N, 4, R/8, R/8) each
        flipped = encode_posterior(comp.vae, pixels.flip(-1), t.vae_batch_size)
        class_posteriors = flipped  # the class images are the mirrored photos (as for diffusers' script)
        emb, _ = encode_text(comp, [INSTANCE_PROMPT, CLASS_PROMPT])  # (2, 77, 768)
    generator = torch.Generator().manual_seed(0)
    b, sched = s.batch, comp.noise_scheduler
    unet.train()
    for _ in range(s.warmup + s.steps):
        idx = training.sample_indices(len(pixels), b, generator)
        cidx = training.sample_indices(len(pixels), b, generator)
        flip = (torch.rand(b, generator=generator) < t.flip_prob).view(-1, 1, 1, 1).to(posteriors.mean.device)
        instance = posteriors[idx].where(flip, flipped[idx]).sample(generator)  # (B, 4, R/8, R/8)
        latents = torch.cat([instance, class_posteriors[cidx].sample(generator)])  # (2B, 4, R/8, R/8)
        encoder_hidden_states = torch.cat([emb[:1].expand(b, -1, -1), emb[1:].expand(b, -1, -1)])  # (2B, 77, 768)
        noisy_latents, noise, timesteps = add_noise(sched, latents, generator)
        with accelerator.autocast():
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        training.loss_and_step(
            accelerator, sched, model_pred, latents, noise, timesteps, True, t, tr.params, optimizer, lr_scheduler
        )
    return clock.result(s.warmup)


def reference_speed(model: Path, photos: Path, s: Settings) -> dict:
    """A stand-in for diffusers' examples/dreambooth/train_dreambooth_lora.py, doing per step what it does
    (its diffusers 0.40 version): open and transform the batch's photos and class images, tokenise and encode both
    prompts, encode the pixels with the VAE (``latent_dist.sample()``), noise, predict, the prior-preservation
    loss, backward, clip, AdamW on a LoRA r4 (alpha 4, Gaussian init) of to_q/k/v/out.0; frozen weights in the
    mixed precision, the LoRA in fp32 for fp16, as the script casts them."""
    import random

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image
    from PIL.ImageOps import exif_transpose
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    clock = StepClock(s.device)
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[s.speed_precision], cpu=s.device == "cpu")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    weight_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[s.speed_precision]
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False)
        m.to(accelerator.device, dtype=weight_dtype)
    # The script's targets; SD 1.5 has no add_k_proj / add_v_proj, so the LoRA sits on to_q/k/v/out.0.
    targets = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    if s.speed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    image_transforms = transforms.Compose(
        [
            transforms.Resize(s.resolution, interpolation=transforms.InterpolationMode.LANCZOS),
            transforms.RandomCrop(s.resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    instance_files, class_files = sorted((photos / "instance").iterdir()), sorted((photos / "class").iterdir())
    rng = random.Random(0)

    def load(path: Path) -> torch.Tensor:  # (3, R, R) in [-1, 1], as the script's DreamBoothDataset
        return image_transforms(exif_transpose(Image.open(path)).convert("RGB"))

    b = s.batch
    unet.train()
    for _ in range(s.warmup + s.steps):
        picked = [rng.randrange(len(instance_files)) for _ in range(b)]
        pixel_values = torch.stack([load(instance_files[i]) for i in picked] + [load(class_files[i]) for i in picked])
        input_ids = torch.cat(
            [
                tokenizer(p, truncation=True, padding="max_length", max_length=77, return_tensors="pt").input_ids
                for p in [INSTANCE_PROMPT] * b + [CLASS_PROMPT] * b
            ]
        )
        with accelerator.accumulate(unet):
            pixel_values = pixel_values.to(accelerator.device, dtype=weight_dtype)
            model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (2 * b,), device=model_input.device
            )
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids.to(accelerator.device), return_dict=False)[0]
            model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
            model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(noise, 2, dim=0)
            instance_loss = F.mse_loss(model_pred.float(), target.float())
            prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float())
            loss = instance_loss + prior_loss  # --prior_loss_weight 1.0
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        loss.detach().item()  # the script logs the loss every step
    return clock.result(s.warmup)


def flags(options: dict) -> list[str]:
    """``{"--name": value}`` as command-line arguments."""
    return [str(x) for option in options.items() for x in option]


def diffusers_speed(script: Path, model: Path, photos: Path, out: Path, s: Settings) -> dict:
    """diffusers' train_dreambooth_lora.py itself, run in this process (so that the step clock sees its
    backward passes) on the random-weight model, the prepared photos and the mirrored ones as class images."""
    import runpy

    clock = StepClock(s.device)
    n_class = len(list((photos / "class").iterdir()))  # all present: the script generates none
    options = {
        "--pretrained_model_name_or_path": model,
        "--instance_data_dir": photos / "instance",
        "--class_data_dir": photos / "class",
        "--prior_loss_weight": 1.0,
        "--num_class_images": n_class,
        "--instance_prompt": INSTANCE_PROMPT,
        "--class_prompt": CLASS_PROMPT,
        "--resolution": s.resolution,
        "--train_batch_size": s.batch,
        "--max_train_steps": s.warmup + s.steps,
        "--learning_rate": 5e-4,
        "--lr_scheduler": "constant",
        "--lr_warmup_steps": 0,
        "--rank": 4,
        "--mixed_precision": MIXED_PRECISION[s.speed_precision],
        "--seed": 0,
        "--output_dir": out,
    }
    sys.argv = [str(script), "--with_prior_preservation", *flags(options)]
    runpy.run_path(str(script), run_name="__main__")
    return clock.result(s.warmup)


# ---------------------------------------------------------------------------------------------------------
# The embedded pipeline through DVC in a copy of the repository


def copy_tree(dest: Path) -> None:
    """The working tree into ``dest``: as git sees it (tests/workspace.py), or, outside a git checkout, every
    file but the environment, caches and git's own folder."""
    try:
        copy_repository(dest)
    except (subprocess.CalledProcessError, FileNotFoundError):
        shutil.copytree(ROOT, dest, ignore=_not_copied, dirs_exist_ok=True)


def _not_copied(folder: str, names: list[str]) -> list[str]:
    """What a copy outside git leaves out: git's folder, the environment, caches (DVC's too)."""
    drop = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
    if Path(folder).name == ".dvc":
        drop |= {"cache", "tmp"}
    return [n for n in names if n in drop]


def pipeline_params(params: dict, profiles: list[dict], device: str, precision: str) -> dict:
    """``params`` with the ``profiles``' values (the test profile, and in a dry run also DRY_PIPELINE), ``device``
    and ``precision``, flips and validation images on."""
    out = {section: dict(values) for section, values in params.items()}
    for profile in profiles:
        for section, values in profile.items():
            out[section].update(values)
    out["common"].update(device=device, precision=precision)
    out["train"]["flip_prob"] = out["train"]["flip_prob"] or 0.5
    out["train"]["validation_every"] = max(1, min(out["train"]["validation_every"] or 3, out["train"]["steps"] // 2))
    return out


def pipeline_outcome(ws: Path) -> tuple[list[str], str]:
    """What a finished `dvc repro` in ``ws`` lacks (a finite final stage-1 loss, validation images, the stage-2
    ControlNet, samples), and a summary of what it made."""
    metrics = ws / "metrics" / "train_stage1_appearance.json"
    loss = json.loads(metrics.read_text()).get("loss") if metrics.exists() else None
    images = len(list((ws / "plots" / "train_stage1_appearance" / "plots" / "images").rglob("*.png")))
    samples = ws / "samples" / "index.json"
    n_samples = len(list((ws / "samples" / "images").rglob("*.png"))) if samples.exists() else 0
    problems = []
    if loss is None or not math.isfinite(loss):
        problems.append(f"final stage-1 loss {loss} is not a finite number")
    if images == 0:
        problems.append("no validation images in plots/train_stage1_appearance/plots/images")
    if not (ws / "models" / "stage2").is_dir():
        problems.append("no models/stage2")
    if n_samples == 0:
        problems.append("no samples")
    shown = f"{loss:.4g}" if isinstance(loss, float) else str(loss)
    finite = "finite" if loss is not None and math.isfinite(loss) else "NOT finite"
    return problems, f"stage-1 loss {shown} ({finite}), {images} validation image(s), {n_samples} sample(s)"


def pipeline_check(work: Path, device: str, precision: str, dry_run: bool) -> dict:
    """`dvc repro` of the embedded pipeline in a fresh copy with the test profile on ``device`` in ``precision``;
    DVC's output streams into this check's log."""
    ws = work / f"pipeline-{precision}"
    shutil.rmtree(ws, ignore_errors=True)  # from an earlier run in the same --work
    ws.mkdir(parents=True)
    copy_tree(ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    profiles = [yaml.safe_load((ws / "profiles" / "test.yaml").read_text())] + ([DRY_PIPELINE] if dry_run else [])
    (ws / "params.yaml").write_text(
        yaml.safe_dump(pipeline_params(params, profiles, device, precision), sort_keys=False)
    )
    remove_outputs(ws)
    git_init(ws, dict(os.environ))
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, started = [], {}  # stage -> when DVC said it runs it
    for line in proc.stdout:
        lines.append(line)
        sys.stderr.write(line)
        found = re.search(r"Running stage '([^']+)'", line)
        if found:
            started[found.group(1)] = time.perf_counter()
    proc.wait()
    marks = [*started.values(), time.perf_counter()]  # each stage runs from its mark to the next
    per_stage = ", ".join(f"{name} {b - a:.0f}" for name, a, b in zip(started, marks, marks[1:], strict=False))
    problems, summary = pipeline_outcome(ws)
    timing = f"`dvc repro` {marks[-1] - start:.0f} s (seconds per stage: {per_stage})"
    if proc.returncode != 0:
        return {"ok": False, "error": error_line("".join(lines)), "detail": f"{summary}; {timing}"}
    return {"ok": not problems, "error": "; ".join(problems), "detail": f"{summary}; {timing}"}


# ---------------------------------------------------------------------------------------------------------
# Running the checks, each in its own process group, and the table


def error_line(text: str) -> str:
    """The line saying why a run failed: posebooth's one-line error, else a traceback's exception, else DVC's
    error, else the last line; prefixed with the stage DVC was running."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = (
        [ln for ln in lines if ln.startswith("ERROR posebooth")]
        or [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
        or [ln for ln in lines if ln.startswith("ERROR")]
        or lines[-1:]
        or ["no output"]
    )
    stages = re.findall(r"Running stage '([^']+)'", text)
    frames = [f for f in re.findall(r'File "([^"]+)", line (\d+)', text) if "site-packages" not in f[0]]
    at = f" (at {'/'.join(Path(frames[-1][0]).parts[-2:])}:{frames[-1][1]})" if frames else ""
    return (f"{stages[-1]}: " if stages else "") + found[-1][:400] + at


def run_worker(name: str, args: argparse.Namespace) -> dict:
    """Run the check ``name`` in this process and return its result."""
    s, work = settings(args), args.work
    if name.startswith("pipeline-"):
        return pipeline_check(work, s.device, name.removeprefix("pipeline-"), s.tiny)
    model = work / "sd15"
    if name == "sd15-model":
        return sd15_check(model, s)
    if not (model / "model_index.json").exists():
        return {"ok": False, "error": f"no model in {model}: the sd15-model check did not finish"}
    photos = training_photos(work, s.resolution)
    if name == "speed-posebooth":
        return posebooth_speed(model, photos, s)
    if name == "speed-reference":
        return reference_speed(model, photos, s)
    if name == "speed-diffusers":
        return diffusers_speed(args.diffusers_script.resolve(), model, photos, work / "diffusers-output", s)
    raise ValueError(f"unknown check {name!r}")


def worker_command(name: str, args: argparse.Namespace) -> list[str]:
    """The command line that runs check ``name`` in a process of its own."""
    options = {"--worker": name, "--work": args.work, "--resolution": args.resolution, "--batch": args.batch}
    options |= {"--warmup": args.warmup, "--steps": args.steps}
    cmd = [sys.executable, str(Path(__file__).resolve()), *flags(options)]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.diffusers_script:
        cmd += ["--diffusers-script", str(args.diffusers_script.resolve())]
    return cmd


def worker_env(args: argparse.Namespace) -> dict:
    """Offline, quiet, this environment's ``dvc`` and ``python`` first; a fresh cache of the checks' own, which
    with ``--keep-cache`` reuses the embedded models already built in ``$POSEBOOTH_CACHE`` (only those: the
    checks' image caches and checkpoints never mix with the caller's)."""
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    cache = args.work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ.get("POSEBOOTH_CACHE", Path.home() / ".cache" / "posebooth")) / "embedded"
    if args.keep_cache and shared.is_dir() and not (cache / "embedded").exists():
        (cache / "embedded").symlink_to(shared.resolve())
    env["POSEBOOTH_CACHE"] = str(cache)
    env.pop("POSEBOOTH_FAILPOINT", None)
    return env


@dataclass
class Running:
    """A check running in its own process group, its output going to its log, its result to its JSON file."""

    name: str
    proc: subprocess.Popen
    log: Path
    start: float
    timeout: float


def result_path(work: Path, name: str) -> Path:
    """Where the worker of check ``name`` writes its result."""
    return work / "logs" / f"{name}.json"


def start_check(name: str, args: argparse.Namespace, timeout: float) -> Running:
    """Start check ``name`` in a process group of its own (so that a timeout can kill all it started)."""
    log = args.work / "logs" / f"{name}.log"
    result_path(args.work, name).unlink(missing_ok=True)  # from an earlier run in the same --work
    with log.open("w") as out:  # the child keeps its own copy of the file
        proc = subprocess.Popen(
            worker_command(name, args),
            cwd=ROOT,
            env=worker_env(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Running(name, proc, log, time.perf_counter(), timeout)


def wait_checks(running: list[Running], work: Path) -> dict[str, dict]:
    """Wait for every check of ``running``, killing the process group of any that passes its timeout; their
    results, each with the seconds it took and, when it failed, the error line from its log."""
    results, pending = {}, list(running)
    while pending:
        for run in list(pending):
            seconds = time.perf_counter() - run.start
            if run.proc.poll() is None and seconds < run.timeout:
                continue
            timed_out = run.proc.poll() is None
            if timed_out:
                os.killpg(run.proc.pid, signal.SIGKILL)  # the check's own process group: dvc and its stages too
                run.proc.wait()
            results[run.name] = check_result(run, timed_out, work) | {"seconds": seconds}
            pending.remove(run)
        time.sleep(0.2)
    return results


def check_result(run: Running, timed_out: bool, work: Path) -> dict:
    """What a finished (or killed) check reported, or why it failed, from its log."""
    text = run.log.read_text(errors="replace")
    if timed_out:
        return {"ok": False, "error": f"timed out after {run.timeout:.0f} s; last: {error_line(text)}"}
    found = result_path(work, run.name)
    if run.proc.returncode != 0 or not found.exists():
        return {"ok": False, "error": f"exit status {run.proc.returncode}: {error_line(text)}"}
    result = json.loads(found.read_text())
    if not result["ok"] and not result.get("error"):
        result["error"] = error_line(text)
    return result


def ratio_row(results: dict[str, dict]) -> dict | None:
    """posebooth's steps/s over the other loop's, when both were measured."""
    other = results.get("speed-diffusers") or results.get("speed-reference")
    mine = results.get("speed-posebooth")
    if not (other and mine and other.get("steps_per_s") and mine.get("steps_per_s")):
        return None
    return {"ok": True, "ratio": mine["steps_per_s"] / other["steps_per_s"]}


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(labels: dict[str, str], results: dict[str, dict]) -> str:
    """The markdown table: one row per check, then posebooth's speed ratio when both speed checks ran."""
    rows = [
        "| check | result | seconds | steps/s or ratio | peak GPU memory (GiB) | detail |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, label in labels.items():
        r = results[name]
        result = "passed" if r["ok"] else "failed"
        speed = f"{r['steps_per_s']:.2f}" if r.get("steps_per_s") else "-"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") else "-"
        detail = "; ".join(x for x in (r.get("error") if not r["ok"] else "", r.get("detail", "")) if x)
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rows.append(f"| `{name}` {cell(label)} | {result} | {seconds} | {speed} | {peak} | {cell(detail)} |")
    if "speed-posebooth" not in labels or not {"speed-diffusers", "speed-reference"} & set(labels):
        return "\n".join(rows)
    ratio = ratio_row(results)
    other = "diffusers' script" if "speed-diffusers" in labels else "the stand-in"
    shown = f"{ratio['ratio']:.2f}x" if ratio else "-"
    rows.append(
        f"| `ratio` posebooth's steps/s over {other}'s | {'passed' if ratio else 'n/a'} | - | {shown} | - | "
        f"{'measured in the same run' if ratio else 'a speed check failed'} |"
    )
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    """The command line (the workers get the same, with --worker)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same code paths on CPU with tiny sizes")
    ap.add_argument("--diffusers-script", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    ap.add_argument("--budget", type=float, default=450, help="seconds for all checks together (default 7.5 min)")
    ap.add_argument("--resolution", type=int, default=512, help="speed checks' resolution (GPU run)")
    ap.add_argument("--batch", type=int, default=1, help="instance images per step, plus as many class images")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps of each speed check")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each speed check")
    ap.add_argument("--checks", nargs="+", help="run only these checks (names as in the table, e.g. sd15-model)")
    ap.add_argument(
        "--work", type=Path, help="folder for copies, model and logs (default: temporary, removed if all pass)"
    )
    ap.add_argument("--logs", type=Path, help="also copy the checks' logs here (e.g. $OUT/gpu-check-logs)")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the embedded models built in $POSEBOOTH_CACHE")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args()


def waves(names: list[str]) -> list[list[str]]:
    """The checks in groups that run at the same time: the pipeline runs and the model build together (the
    embedded pipeline uses little of a GPU and mostly one CPU core per run), each speed check alone, so that
    its steps/s and peak memory are its own."""
    together = [n for n in names if not n.startswith("speed-")]
    return ([together] if together else []) + [[n] for n in names if n not in together]


def cap(name: str, dry_run: bool) -> float:
    """The most seconds check ``name`` may take."""
    return (DRY_CAPS if dry_run else CAPS)["pipeline" if name.startswith("pipeline-") else name]


def run_checks(labels: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    """Run the checks, wave by wave, each under its cap and the time left of the budget."""
    deadline = time.perf_counter() + args.budget
    results: dict[str, dict] = {}
    for wave in waves(list(labels)):
        left = deadline - time.perf_counter()
        if left < 5:
            results |= {n: {"ok": False, "error": f"skipped: the {args.budget:.0f} s budget is spent"} for n in wave}
            continue
        print(f"{', '.join(wave)}: running", file=sys.stderr, flush=True)
        running = [start_check(n, args, min(cap(n, args.dry_run), left)) for n in wave]
        for name, r in wait_checks(running, args.work).items():
            outcome = "passed" if r["ok"] else f"failed: {r.get('error', '')}"
            print(f"{name}: {outcome} ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
            results[name] = r
    return {name: results[name] for name in labels}


def main() -> None:
    args = parse_args()
    if args.worker:
        if args.work is None:
            sys.exit("--worker needs --work")
        result = run_worker(args.worker, args)
        result_path(args.work, args.worker).parent.mkdir(parents=True, exist_ok=True)
        result_path(args.work, args.worker).write_text(json.dumps(result))
        print(json.dumps(result))
        return
    if args.diffusers_script and not args.diffusers_script.is_file():
        sys.exit(f"--diffusers-script: {args.diffusers_script} is not a file")
    labels = checks(settings(args), args.diffusers_script)
    if args.checks:
        if set(args.checks) - set(labels):
            sys.exit(f"--checks: unknown {sorted(set(args.checks) - set(labels))}; choose from {list(labels)}")
        labels = {k: v for k, v in labels.items() if k in args.checks}
    temporary = args.work is None
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="posebooth-gpu-check-"))).resolve()
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    results = run_checks(labels, args)
    if args.logs:
        shutil.copytree(args.work / "logs", args.logs, dirs_exist_ok=True)
    failed = [name for name, r in results.items() if not r["ok"]]
    if temporary and not failed:
        shutil.rmtree(args.work, ignore_errors=True)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "diffusers", "accelerate", "peft"))
    mode = "dry run on CPU (tiny sizes: the figures measure nothing)" if args.dry_run else "on one CUDA GPU"
    logs = f"logs in {args.work / 'logs'}" if args.work.exists() else "logs removed (all passed; --work DIR keeps them)"
    print(f"\nposebooth GPU check, {mode}; {versions}; {logs}\n")
    print(table(labels, results))
    if failed:
        print(f"\nfailed: {', '.join(failed)} (work folder kept: {args.work})")
        sys.exit(1)


if __name__ == "__main__":
    main()
