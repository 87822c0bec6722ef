"""Training knobs shared by both stages: min-SNR, offset noise, schedules, accumulation, 8-bit AdamW,
and stage 2's frozen identity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from posebooth import training
from posebooth.diffusion import add_noise, min_snr_weights, prior_preservation_loss


def knobs(**change):
    base = dict(steps=4, lr=0.1, weight_decay=0.0, optimizer="adamw", lr_scheduler="constant", lr_warmup_steps=0,
                gradient_accumulation_steps=1, gradient_checkpointing=False, max_grad_norm=1e9)  # fmt: skip
    base.update(change)
    return SimpleNamespace(**base)


def test_min_snr_weights_by_hand():
    # Betas chosen so that ᾱ_t = 0.9, 0.8, 0.5, 0.2: SNR = ᾱ / (1 − ᾱ) = 9, 4, 1, 0.25.
    betas = dict(num_train_timesteps=4, trained_betas=[0.1, 1 / 9, 0.375, 0.6])
    eps = DDPMScheduler(prediction_type="epsilon", **betas)
    v = DDPMScheduler(prediction_type="v_prediction", **betas)
    assert eps.alphas_cumprod.tolist() == pytest.approx([0.9, 0.8, 0.5, 0.2])
    t = torch.tensor([0, 1, 2, 3])
    # Min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction, min(SNR, γ) / (SNR + 1) for v.
    assert min_snr_weights(eps, t, 5.0).tolist() == pytest.approx([5 / 9, 1.0, 1.0, 1.0], rel=1e-5)
    assert min_snr_weights(eps, t, 2.0).tolist() == pytest.approx([2 / 9, 0.5, 1.0, 1.0], rel=1e-5)
    assert min_snr_weights(v, t, 5.0).tolist() == pytest.approx([0.5, 0.8, 0.5, 0.2], rel=1e-5)
    assert min_snr_weights(v, t, 2.0).tolist() == pytest.approx([0.2, 0.4, 0.5, 0.2], rel=1e-5)
    assert min_snr_weights(eps, torch.tensor([2, 0]), 5.0).tolist() == pytest.approx([1.0, 5 / 9], rel=1e-5)


def test_weighted_loss_by_hand():
    pred, target = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    loss, inst, prior = prior_preservation_loss(pred, target, 1.0, True, torch.tensor([0.5, 2.0]))
    assert (inst.item(), prior.item(), loss.item()) == (0.5, 2.0, 2.5)


def test_offset_noise_shifts_whole_channels():
    sched = DDPMScheduler()
    latents = torch.zeros(64, 4, 8, 8)
    _, plain, _ = add_noise(sched, latents, torch.Generator().manual_seed(0))
    _, offset, _ = add_noise(sched, latents, torch.Generator().manual_seed(0), noise_offset=1.0)
    per_channel_mean = offset.mean(dim=(2, 3))
    assert per_channel_mean.std() > 3 * plain.mean(dim=(2, 3)).std()


def test_warmup_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = training.make_optimizer([p], 1.0, 0.0)
    sched = training.make_lr_scheduler(opt, "constant_with_warmup", 4, 10)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def _run(accumulation: int, batches: list[torch.Tensor]):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    params = list(model.parameters())
    acc, (model,), opt, sched = training.prepare(
        [model], params, knobs(gradient_accumulation_steps=accumulation, lr=0.1), "cpu", "fp32"
    )
    for x in batches:
        with acc.accumulate(model):
            loss = model(x).pow(2).mean()
            training.backward_and_step(acc, loss, params, opt, sched, 1e9)
    return [p.detach().clone() for p in acc.unwrap_model(model).parameters()]


def test_gradient_accumulation_equals_the_bigger_batch():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    one_step_of_four = _run(1, [x])
    two_micro_batches = _run(2, [x[:2], x[2:]])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one_step_of_four, two_micro_batches, strict=True))
    two_steps = _run(1, [x[:2], x[2:]])
    assert not all(torch.allclose(a, b) for a, b in zip(one_step_of_four, two_steps, strict=True))


def test_adamw_8bit_keeps_8bit_state_when_the_minimum_is_lowered():
    p = torch.nn.Parameter(torch.randn(16, 64))
    opt = training.make_optimizer([p], 1e-3, 0.0, "adamw_8bit", min_8bit_size=256)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    fp32 = training.make_optimizer([p], 1e-3, 0.0, "adamw_8bit")  # default 4096: a tiny LoRA stays fp32
    fp32.step()
    assert fp32.state[p]["state1"].dtype == torch.float32


def test_gradient_checkpointing_is_switched_on(tiny_sd):
    from posebooth.models import load_components

    unet = load_components("embedded:tiny-sd15").unet
    params = [p for p in unet.parameters()][:2]
    for p in params:
        p.requires_grad_(True)
    acc, (unet,), *_ = training.prepare([unet], params, knobs(gradient_checkpointing=True), "cpu", "bf16")
    assert acc.unwrap_model(unet).is_gradient_checkpointing
    assert acc.mixed_precision == "bf16"


def test_stage2_step_trains_only_the_controlnet(tiny_sd, tmp_path):
    """One ControlNet step with the stage-1 LoRA loaded: the UNet (and its LoRA), the text encoder and the
    VAE stay bit-identical; the ControlNet changes."""
    from posebooth.diffusion import diffusion_target
    from posebooth.lora import add_unet_lora, load_unet_lora, save_unet_lora
    from posebooth.models import encode_prompts, load_components, load_controlnet

    donor = load_components("embedded:tiny-sd15")
    add_unet_lora(donor.unet, 4, 4.0, ["to_q", "to_v"])
    torch.nn.init.normal_(next(p for n, p in donor.unet.named_parameters() if "lora_B" in n))
    save_unet_lora(donor.unet, tmp_path)

    comp = load_components("embedded:tiny-sd15")
    controlnet = load_controlnet("embedded:tiny-sd15-openpose", comp.unet)
    load_unet_lora(comp.unet, tmp_path)
    frozen = {f"unet.{k}": v.clone() for k, v in comp.unet.state_dict().items()}
    frozen |= {f"te.{k}": v.clone() for k, v in comp.text_encoder.state_dict().items()}
    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    params = [p for p in controlnet.parameters()]
    for p in params:
        p.requires_grad_(True)
    acc, (controlnet,), opt, sched = training.prepare([controlnet], params, knobs(lr=1e-3), "cpu", "fp32")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    ehs = encode_prompts(comp.tokenizer, comp.text_encoder, ["a photo of sks robot", "a photo of a robot"])
    noisy, noise, t = add_noise(comp.noise_scheduler, latents, g)
    down, mid = controlnet(
        noisy, t, encoder_hidden_states=ehs, controlnet_cond=torch.rand(2, 3, 32, 32), return_dict=False
    )
    pred = comp.unet(noisy, t, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    loss, _, prior = prior_preservation_loss(pred, diffusion_target(comp.noise_scheduler, latents, noise, t), 1.0, True)
    training.backward_and_step(acc, loss, params, opt, sched, 1.0)
    assert prior > 0
    after = {f"unet.{k}": v for k, v in comp.unet.state_dict().items()} | {
        f"te.{k}": v for k, v in comp.text_encoder.state_dict().items()
    }
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any("lora" in k for k in frozen)
    changed = acc.unwrap_model(controlnet).state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before)


def test_attention_is_pytorch_sdpa(tiny_sd):
    """Every attention layer of the UNet, the ControlNet and the Custom Diffusion processors goes through
    torch's scaled_dot_product_attention (flash / memory-efficient kernels where the device has them)."""
    import copy

    from posebooth import methods
    from posebooth.models import load_components, load_controlnet

    comp = load_components(tiny_sd, "cpu", "fp32")
    assert {type(p).__name__ for p in comp.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    controlnet = load_controlnet("from_unet", comp.unet, "cpu")
    assert {type(p).__name__ for p in controlnet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert comp.text_encoder.config._attn_implementation == "sdpa"
    t = SimpleNamespace(lr=1e-4, train_token_embedding=False)
    cd = copy.deepcopy(comp)
    methods.setup("custom_diffusion", cd, t, "sks", "robot")
    assert {type(p).__name__ for p in cd.unet.attn_processors.values()} == {"CustomDiffusionAttnProcessor2_0"}


def test_the_training_summary_takes_numbers_only(tmp_path):
    """What a stage adds to its metrics file: a name or a flag there would make `dvc exp show` columns come and go
    between experiments, so it is refused (the method is the param train.method)."""
    log = training.StepLog(tmp_path / "metrics.json", tmp_path / "plots")
    try:
        for bad in ({"method": "lora"}, {"with_prior": True}):
            with pytest.raises(ValueError, match="metrics must be numbers or null"):
                log.summary(steps=4, **bad)
        log.summary(steps=4, pairs=6, class_pairs=None)
    finally:
        log.abort()
