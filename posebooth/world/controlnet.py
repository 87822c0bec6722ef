"""Pretraining the world's OpenPose ControlNet on the saved base model (``out/base``, fp16 on disk).

The ControlNet is made from the base UNet as users load it (``ControlNetModel.from_unet`` of the fp16 weights
read back in fp32), and trained on (latents, pose map, caption) of robots (OpenPose-18) and dogs (the world's
quadruped skeleton) with the VAE, text encoder and UNet frozen, as diffusers' train_controlnet.py does: the
pose map in [0, 1], the prompt dropped with ``caption_dropout`` so that the pose alone steers. Pose maps are
drawn by ``posebooth.poses.render_pose`` at ``render_size`` (the world profile's ``extract_poses.render_size``):
at 64 px, OpenPose's 512 px sticks shrink to one faint pixel; drawn at 256 px they keep two.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from posebooth.world.pretrain import _batches, _diffusion_step, _token_ids, encode_all, noise_scheduler

log = logging.getLogger(__name__)

RECIPE = {
    "seed": 20261202,
    "threads": 1,
    "size": 64,
    "scenes": 12000,  # robots and dogs only: every scene has a skeleton
    "render_size": 256,  # pose maps drawn at this size, then resized to 64 px (extract_poses.render_size)
    "steps": 1600,
    "batch": 32,
    "lr": 3e-4,
    "caption_dropout": 0.3,
}

HELD_OUT = 256  # the last scenes: the held-out check of the pose's effect (fewer in a quick run)
# The ControlNet's pose-map encoder downsamples once per entry after the first: 4x, like the VAE.
CONDITIONING_CHANNELS = (16, 32, 48)


def render_pose_scenes(seed: int, n: int, size: int, render_size: int):
    """``n`` scenes of robots and dogs: pixels (N, 3, S, S) uint8, captions, pose maps (N, 3, S, S) uint8."""
    from posebooth.poses import render_pose
    from posebooth.world import scenes

    rng = np.random.default_rng(seed)
    pixels, maps, captions = np.zeros((n, size, size, 3), np.uint8), np.zeros((n, size, size, 3), np.uint8), []
    for i in tqdm(range(n), desc="world: render pose scenes", unit="scene"):
        scene = scenes.sample_scene(rng, classes=("robot", "dog"))
        pixels[i] = np.asarray(scenes.render(scene, size)[0])
        maps[i] = np.asarray(render_pose(scenes.scene_pose(scene, size), size, render_size))
        captions.append(scenes.caption(scene, rng))

    def chw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

    return chw(pixels), captions, chw(maps)


def load_base(out: Path):
    """The saved base model (``out/base``) in fp32: VAE, text encoder, UNet, and the real CLIP tokenizer."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from posebooth.embedded import _clip_tokenizer

    base = Path(out) / "base"
    if not (base / "unet" / "config.json").exists():
        raise FileNotFoundError(f"{base}: the world's base model is missing; build it first (--parts base)")
    f32 = torch.float32
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True, torch_dtype=f32)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True, torch_dtype=f32)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True, dtype=f32)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp))
    return vae.eval(), text_encoder.eval(), unet.eval(), tokenizer


def train(out: Path, recipe: dict = RECIPE) -> dict:
    """Train the world's OpenPose ControlNet on the base model saved in ``out/base`` and save it to
    ``out/openpose`` (fp16); returns its figures (seconds, losses)."""
    from diffusers import ControlNetModel

    torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])
    start = time.perf_counter()
    vae, text_encoder, unet, tokenizer = load_base(out)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    pixels, captions, pose_maps = render_pose_scenes(recipe["seed"], recipe["scenes"], recipe["size"],
                                                     recipe["render_size"])  # fmt: skip
    rendered = time.perf_counter() - start
    mean, std = encode_all(vae, pixels)
    ids, empty = _token_ids(tokenizer, captions), _token_ids(tokenizer, [""])
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    scheduler = noise_scheduler()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=recipe["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe["seed"] + 1)
    losses = []
    n_held = min(HELD_OUT, len(mean) // 4)
    held = slice(len(mean) - n_held, len(mean))  # never trained on: the check below
    batches = list(_batches(len(mean) - n_held, recipe["batch"], recipe["steps"], generator))
    for idx in tqdm(batches, desc="world: ControlNet", unit="step"):
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)  # (B, 4, h, w)
        drop = torch.rand(len(idx), generator=generator) < recipe["caption_dropout"]
        with torch.no_grad():
            encoder_hidden_states = text_encoder(torch.where(drop[:, None], empty, ids[idx]))[0]
        controlnet_cond = pose_maps[idx].float() / 255.0  # (B, 3, S, S) in [0, 1]

        def with_control(noisy_latents, timesteps, states, cond=controlnet_cond):
            down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=states, controlnet_cond=cond,
                                   return_dict=False)  # fmt: skip
            return unet(noisy_latents, timesteps, states, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid)  # fmt: skip

        loss = _diffusion_step(with_control, scheduler, latents, encoder_hidden_states, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    controlnet.eval().requires_grad_(False)
    trained = time.perf_counter() - start - rendered
    # Does the pose steer? The loss on held-out scenes with their own pose maps against blank ones (the same
    # noise and timesteps): equal means the ControlNet learned nothing from the pose.
    with torch.no_grad():
        states = text_encoder(ids[held])[0]
        pose_loss = {}
        own = pose_maps[held].float() / 255
        for name, cond in (("own_pose", own), ("blank_pose", torch.zeros_like(own))):
            g = torch.Generator().manual_seed(recipe["seed"] + 2)

            def with_control(noisy_latents, timesteps, states, cond=cond):
                down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=states, controlnet_cond=cond,
                                       return_dict=False)  # fmt: skip
                return unet(noisy_latents, timesteps, states, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid)  # fmt: skip

            pose_loss[name] = float(_diffusion_step(with_control, scheduler, mean[held], states, g))
    save(out, controlnet)
    return {"seconds": {"render": round(rendered, 1), "train": round(trained, 1)},
            "torch": torch.__version__, "loss_first_100": float(np.mean(losses[:100])),
            "loss_last_100": float(np.mean(losses[-100:])), "held_out_loss": pose_loss}  # fmt: skip


def save(out: Path, controlnet) -> None:
    """The ControlNet in fp16 safetensors under ``out/openpose`` (``embedded:world-openpose``)."""
    import shutil

    folder = Path(out) / "openpose"
    shutil.rmtree(folder, ignore_errors=True)
    controlnet.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    controlnet.to(torch.float32)
