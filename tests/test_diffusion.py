"""The DreamBooth prior-preservation loss and the training targets, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from posebooth.diffusion import add_noise, diffusion_target, prior_preservation_loss


def test_zero_when_prediction_equals_target():
    t = torch.randn(4, 4, 2, 2)
    loss, inst, prior = prior_preservation_loss(t, t.clone(), 1.0, with_prior=True)
    assert loss.item() == inst.item() == prior.item() == 0.0


def test_hand_computed_value_and_instance_half_first():
    target = torch.zeros(2, 1, 1, 2)
    pred = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 2.0]]]])  # instance error 1 -> mse 1; class error 2 -> mse 4
    loss, inst, prior = prior_preservation_loss(pred, target, 0.5, with_prior=True)
    assert inst.item() == 1.0 and prior.item() == 4.0
    assert loss.item() == pytest.approx(1.0 + 0.5 * 4.0)


def test_lambda_zero_equals_instance_only_loss():
    pred, target = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    loss, inst, _ = prior_preservation_loss(pred, target, 0.0, with_prior=True)
    only, _, _ = prior_preservation_loss(pred[:2], target[:2], 0.0, with_prior=False)
    assert loss.item() == pytest.approx(inst.item()) == pytest.approx(only.item())


def test_without_prior_is_plain_mse():
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    loss, inst, prior = prior_preservation_loss(pred, target, 1.0, with_prior=False)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item())
    assert prior.item() == 0.0


def test_targets_for_epsilon_and_v_prediction():
    # Two timesteps with betas 0.2 and 0.375: ᾱ_0 = 0.8 and ᾱ_1 = 0.8 · 0.625 = 0.5.
    betas = dict(num_train_timesteps=2, trained_betas=[0.2, 0.375])
    latents = torch.tensor([[[[1.0, 2.0]]], [[[1.0, -1.0]]]])  # x0, (2, 1, 1, 2)
    noise = torch.tensor([[[[1.0, 0.0]]], [[[3.0, 1.0]]]])  # ε
    t = torch.tensor([0, 1])
    eps = DDPMScheduler(prediction_type="epsilon", **betas)
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction", **betas)
    assert v.alphas_cumprod.tolist() == pytest.approx([0.8, 0.5])
    # v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0 (Salimans & Ho 2022): (2ε − x0) / √5 at t = 0, (ε − x0) / √2 at t = 1.
    s5, s2 = 5**0.5, 2**0.5
    expected = torch.tensor([[[[1 / s5, -2 / s5]]], [[[2 / s2, 2 / s2]]]])
    torch.testing.assert_close(diffusion_target(v, latents, noise, t), expected, rtol=0, atol=1e-6)
    bad = DDPMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        diffusion_target(bad, latents, noise, t)


def test_add_noise_is_seeded():
    sched = DDPMScheduler()
    latents = torch.randn(2, 4, 2, 2)
    a = add_noise(sched, latents, torch.Generator().manual_seed(3))
    b = add_noise(sched, latents, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert a[2].shape == (2,) and a[2].max() < 1000
