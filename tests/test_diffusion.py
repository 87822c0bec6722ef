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
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([10, 500])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.allclose(diffusion_target(v, latents, noise, t), v.get_velocity(latents, noise, t))
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
