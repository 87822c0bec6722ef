"""Diffusion training maths shared by both training stages: noising, targets, the DreamBooth loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise(
    noise_scheduler, latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0, rank_world=(0, 1)
):
    """Sample noise and timesteps, return ``(noisy_latents, noise, timesteps)`` (forward process q(x_t | x_0)).

    ``noise_offset`` > 0 adds a per-channel constant to the noise (offset noise, Guttenberg 2023), which
    lets the model learn very dark or bright images. Under ``accelerate launch`` (``rank_world`` = this
    process's rank and the number of processes) the numbers of all processes' batches are drawn and this
    process keeps its own, so every process's generator stays in step; one process draws what it always did.
    """
    rank, world = rank_world
    noise = torch.randn((world, *latents.shape), generator=generator)[rank]  # (B, 4, h, w)
    if noise_offset:
        offset = torch.randn(world, latents.shape[0], latents.shape[1], 1, 1, generator=generator)[rank]
        noise = noise + noise_offset * offset
    noise = noise.to(latents.device, latents.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (world, latents.shape[0]), generator=generator
    )[rank].to(latents.device)  # (B,)
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon models) or the velocity (v-prediction models)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), (B,): ``min(SNR, γ) / SNR`` for epsilon prediction,
    ``min(SNR, γ) / (SNR + 1)`` for v-prediction, with ``SNR = ᾱ_t / (1 − ᾱ_t)``."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def prior_preservation_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    prior_loss_weight: float,
    with_prior: bool,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth loss (Ruiz et al. 2022, eq. 2): ``mse(instance) + λ · mse(class prior)``.

    With ``with_prior`` the batch is instance samples then class samples (2B, ...), as diffusers'
    train_dreambooth.py concatenates them; the prediction is split in two, instance half first.
    ``weights`` are per-sample (2B,) or per-element (same shape as ``target``) loss weights, for example
    min-SNR weights or a face-region map. Returns ``(loss, instance_loss, prior_loss)``; the prior loss
    is 0 without class samples.
    """
    err = F.mse_loss(model_pred.float(), target.float(), reduction="none")  # (2B, C, h, w)
    if weights is not None:
        err = err * (weights.view(-1, *[1] * (err.dim() - 1)) if weights.dim() == 1 else weights)
    per_sample = err.mean(dim=tuple(range(1, err.dim())))  # (2B,)
    if with_prior:
        instance, prior = (half.mean() for half in torch.chunk(per_sample, 2, dim=0))
        return instance + prior_loss_weight * prior, instance, prior
    instance = per_sample.mean()
    return instance, instance, torch.zeros_like(instance)
