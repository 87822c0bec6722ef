"""Diffusion training maths shared by both training stages: noising, targets, the DreamBooth loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise(noise_scheduler, latents: torch.Tensor, generator: torch.Generator):
    """Sample noise and timesteps, return ``(noisy_latents, noise, timesteps)`` (forward process q(x_t | x_0))."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)  # (B, 4, h, w)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(latents.device)  # (B,)
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon models) or the velocity (v-prediction models)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")


def prior_preservation_loss(
    model_pred: torch.Tensor, target: torch.Tensor, prior_loss_weight: float, with_prior: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth loss (Ruiz et al. 2022, eq. 2): ``mse(instance) + λ · mse(class prior)``.

    With ``with_prior`` the batch is instance samples then class samples (2B, ...), as diffusers'
    train_dreambooth.py concatenates them; the prediction is split in two, instance half first.
    Returns ``(loss, instance_loss, prior_loss)``; the prior loss is 0 without class samples.
    """
    if with_prior:
        pred_inst, pred_prior = torch.chunk(model_pred, 2, dim=0)
        tgt_inst, tgt_prior = torch.chunk(target, 2, dim=0)
        instance = F.mse_loss(pred_inst.float(), tgt_inst.float())
        prior = F.mse_loss(pred_prior.float(), tgt_prior.float())
        return instance + prior_loss_weight * prior, instance, prior
    instance = F.mse_loss(model_pred.float(), target.float())
    return instance, instance, torch.zeros_like(instance)
