"""Pretraining the world's base model on procedural scenes: the VAE, then the text encoder with the UNet.

The architecture is Stable Diffusion 1.5's at a small size, so the whole pipeline loads it through the same
``from_pretrained`` calls as SD 1.5: an ``AutoencoderKL`` (4x: 64 px images, 16x16x4 latents), a
``CLIPTextModel`` on the real CLIP tokenizer (49,408 tokens) and a ``UNet2DConditionModel`` with SD's noise
schedule (scaled-linear betas 0.00085 to 0.012, 1000 steps, epsilon prediction). Everything is drawn from
``RECIPE`` and its seed: the same recipe on the same machine gives the same weights, bit for bit (CPU kernels
are deterministic at a fixed thread count, which the recipe fixes).

Order (each model frozen once trained): the VAE on pixels; the UNet with the text encoder, on latents drawn
from the cached posteriors of the VAE. Captions are dropped with ``caption_dropout`` so that classifier-free
guidance works. The OpenPose ControlNet is the next part (``posebooth.world.controlnet``), trained on the
saved base; ``posebooth.world.build`` runs the parts.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)

# What makes the world's weights: change a value, run `make world`, commit the result.
RECIPE = {
    "seed": 20261201,
    "threads": 1,  # one core: bit-identical at a fixed thread count, and it leaves the other core free
    "size": 64,  # pixels
    "scenes": 16000,  # pretraining renders (robots, dogs, vases in every context; the sample subject never)
    "vae": {"steps": 400, "batch": 16, "lr": 1e-3, "kl": 1e-6},
    "unet": {"steps": 2400, "batch": 32, "lr": 4e-4, "warmup": 100, "caption_dropout": 0.1},
}


def vae_config() -> dict:
    """A 4x AutoencoderKL (two downsamplings): 64 px images, 16x16x4 latents."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16)  # fmt: skip


def text_encoder_config() -> dict:
    """A 2-layer, 64-wide CLIP text transformer over the real CLIP vocabulary."""
    return dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=64, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)  # fmt: skip


def unet_config() -> dict:
    """SD 1.5's UNet layout at 48/96/96 channels, one layer per block; attention (self and cross, to the 64-wide
    text) at 8x8 and 4x4 only: at 16x16 it took half of a CPU step."""
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 96),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                attention_head_dim=4, norm_num_groups=16)  # fmt: skip


def noise_scheduler():
    """SD 1.5's training schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)  # fmt: skip


# The scene generator: every part's code hash covers it (a change to the world redraws every training set).
SCENE_MODULES = ("scenes.py", "backgrounds.py", "drawing.py", "robot.py", "dog.py", "vase.py")


def code_hash(*modules: str) -> str:
    """Hash of the code that makes a part of the world: the scene generator and ``modules`` (file names in
    posebooth/world; default this one)."""
    h = hashlib.sha256()
    for name in sorted({*SCENE_MODULES, *(modules or (Path(__file__).name,))}):
        h.update(name.encode() + (Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Scenes:
    """Rendered training data: pixels (N, 3, S, S) uint8 in [0, 255] and one caption each."""

    pixels: torch.Tensor
    captions: list[str]


def render_scenes(seed: int, n: int, size: int) -> Scenes:
    """``n`` random scenes of every class (never the held-out subject) and their captions."""
    from posebooth.world import scenes

    rng = np.random.default_rng(seed)
    pixels, captions = np.zeros((n, size, size, 3), np.uint8), []
    for i in tqdm(range(n), desc="world: render scenes", unit="scene"):
        scene = scenes.sample_scene(rng)
        pixels[i] = np.asarray(scenes.render(scene, size)[0])
        captions.append(scenes.caption(scene, rng))
    return Scenes(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions)


def _pixels(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [-1, 1]."""
    return batch.float() / 127.5 - 1


def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    """``steps`` random index batches into ``n`` items."""
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=generator)


def train_vae(pixels: torch.Tensor, recipe: dict, generator: torch.Generator):
    """The VAE on the scenes: L1 + MSE reconstruction and a small KL term; its ``scaling_factor`` is then set to
    1 / std of the latents, as SD's 0.18215 was chosen."""
    from diffusers import AutoencoderKL

    r = recipe["vae"]
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=r["lr"], weight_decay=0.0)
    for idx in tqdm(list(_batches(len(pixels), r["batch"], r["steps"], generator)), desc="world: VAE", unit="step"):
        x = _pixels(pixels[idx])  # (B, 3, S, S) in [-1, 1]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + r["kl"] * dist.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = _pixels(pixels[: 8 * r["batch"]])
        std = torch.cat([vae.encode(sample[i : i + 64]).latent_dist.mean for i in range(0, len(sample), 64)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return vae


def encode_all(vae, pixels: torch.Tensor, batch: int = 128):
    """Scaled posterior mean and std of every scene (N, 4, S/4, S/4) each."""
    from posebooth.models import encode_posterior

    means, stds = [], []
    for start in tqdm(range(0, len(pixels), batch), desc="world: encode", unit="batch"):
        posterior = encode_posterior(vae, _pixels(pixels[start : start + batch]), batch)
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids  # fmt: skip


def _diffusion_step(unet, scheduler, latents, encoder_hidden_states, generator, **extra) -> torch.Tensor:
    """The epsilon-prediction loss of one batch at random timesteps."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, **extra).sample
    return F.mse_loss(model_pred, noise)


def train_unet(latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], tokenizer, recipe: dict,
               generator: torch.Generator):  # fmt: skip
    """The UNet and the text encoder together (from scratch, both), with caption dropout for guidance."""
    from diffusers import UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    r = recipe["unet"]
    unet, text_encoder = UNet2DConditionModel(**unet_config()), CLIPTextModel(CLIPTextConfig(**text_encoder_config()))
    scheduler = noise_scheduler()
    ids, empty = _token_ids(tokenizer, captions), _token_ids(tokenizer, [""])
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.0)  # no decay: unused vocabulary rows stay
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=r["warmup"], num_training_steps=r["steps"])
    mean, std = latents
    losses = []
    for idx in tqdm(list(_batches(len(mean), r["batch"], r["steps"], generator)), desc="world: UNet", unit="step"):
        x = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)  # (B, 4, h, w)
        drop = torch.rand(len(idx), generator=generator) < r["caption_dropout"]
        batch_ids = torch.where(drop[:, None], empty, ids[idx])  # (B, 77)
        loss = _diffusion_step(unet, scheduler, x, text_encoder(batch_ids)[0], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        losses.append(loss.item())
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False), losses


def pretrain(out: Path, recipe: dict = RECIPE) -> dict:
    """Make the world's base model from ``recipe`` and save it under ``out/base`` (a diffusers pipeline folder
    without tokenizer, fp16); returns its figures (seconds per step of the recipe, loss)."""
    from posebooth.embedded import _clip_tokenizer

    torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])
    times, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp))
    data = render_scenes(recipe["seed"], recipe["scenes"], recipe["size"])
    times["render"] = time.perf_counter() - start
    generator = torch.Generator().manual_seed(recipe["seed"] + 1)
    vae = train_vae(data.pixels, recipe, generator)
    times["vae"] = time.perf_counter() - start - sum(times.values())
    latents = encode_all(vae, data.pixels)
    unet, text_encoder, unet_losses = train_unet(latents, data.captions, tokenizer, recipe, generator)
    times["unet"] = time.perf_counter() - start - sum(times.values())
    save(Path(out) / "base", vae, text_encoder, unet)
    return {"seconds": {k: round(v, 1) for k, v in times.items()}, "torch": torch.__version__,
            "unet_loss_last_100": float(np.mean(unet_losses[-100:]))}  # fmt: skip


def save(base: Path, vae, text_encoder, unet) -> None:
    """The models in fp16 safetensors, in diffusers' folder layout (``base`` loads like SD 1.5 once a tokenizer
    folder is added, which ``embedded:world`` does)."""
    import json
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        model.to(torch.float16).save_pretrained(base / name, safe_serialization=True)
        model.to(torch.float32)
    noise_scheduler().save_pretrained(base / "scheduler")
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2) + "\n")  # fmt: skip
