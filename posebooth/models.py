"""Loading the base model and ControlNet through ``from_pretrained`` (hub id, local folder or embedded).

The embedded tiny model is built once into a cache folder (see ``embedded.py``) and then goes through
exactly the same calls as ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posebooth import embedded, hub


@dataclass
class Components:
    """The parts of an SD 1.5-style pipeline that posebooth trains and samples with."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler with the model's training schedule
    ref: str


def _offline_hint(ref: str, err: Exception) -> OSError:
    return OSError(
        f"cannot load model {ref!r}: {err}. If it is a hub id, {hub.how_to_get(ref)}; 'embedded:tiny-sd15' runs offline."
    )


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_components(ref: str, device: str = "cpu", precision: str = "fp32") -> Components:
    """Load tokenizer, text encoder, VAE, UNet (frozen, in ``precision``) and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = embedded.resolve(ref)
    if not embedded.is_embedded(ref):
        hub.require(path, "unet/config.json", "base model")
    dtype = DTYPES[precision]
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True, dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, torch_dtype=dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as err:
        raise _offline_hint(ref, err) from err
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, ref)


def load_controlnet(ref: str, unet=None, device: str = "cpu", precision: str = "fp32"):
    """A ControlNet from ``ref`` or, for ``"from_unet"``, initialised from ``unet`` (which must carry no LoRA)."""
    from diffusers import ControlNetModel

    if ref == "from_unet":
        if unet is None:
            raise ValueError("train_pose.controlnet: 'from_unet' needs the base UNet")
        return ControlNetModel.from_unet(unet).to(device, DTYPES[precision])
    if not embedded.is_embedded(ref):
        hub.require(ref, "config.json", "ControlNet")
    try:
        path = embedded.resolve(ref)
        return ControlNetModel.from_pretrained(path, use_safetensors=True, torch_dtype=DTYPES[precision]).to(device)
    except OSError as err:
        raise _offline_hint(ref, err) from err


SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def make_scheduler(name: str, config):
    """A sampling scheduler by its params name, configured like the model's own scheduler."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULER_CLASSES)}")
    return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(config)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> ``encoder_hidden_states`` (B, 77, D), padded to the tokenizer's max length like SD."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8) (the posterior's mean)."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return latents * vae.config.scaling_factor


def sd_pipeline(comp: Components, scheduler_name: str, controlnet=None):
    """A stock diffusers (ControlNet) pipeline from loaded components, with the named scheduler."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    parts = dict(
        vae=comp.vae,
        text_encoder=comp.text_encoder,
        tokenizer=comp.tokenizer,
        unet=comp.unet,
        scheduler=make_scheduler(scheduler_name, comp.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if controlnet is None:
        pipe = StableDiffusionPipeline(**parts)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def drop_local_paths(folder) -> None:
    """Remove the ``_name_or_path`` diffusers and transformers write into saved configs: it records where
    the base model happened to be loaded from (a cache folder), which would make the same training give
    different files on different machines. Loading does not need it."""
    import json
    from pathlib import Path

    for config in [*Path(folder).rglob("config.json"), *Path(folder).rglob("model_index.json")]:
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def weights_fingerprint(ref: str) -> str:
    """What identifies the weights behind ``ref``, for caches of things they generate.

    Embedded: its name and builder hash (not where the cache lives, so outputs that record it are the same
    on every machine). Local folder: a hash of its files' names, sizes and modification times. Hub id: the
    cached snapshot's commit, else the id itself.
    """
    import hashlib
    from pathlib import Path

    path = embedded.resolve(ref)
    if embedded.is_embedded(ref):
        return f"{ref}@{Path(path).name}"
    if Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        stat = "\n".join(f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
        return f"{Path(path).resolve()}#{hashlib.sha256(stat.encode()).hexdigest()[:16]}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "unet/config.json")
    return f"{ref}@{Path(cached).parents[1].name}" if isinstance(cached, str) else ref
