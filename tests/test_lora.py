"""One real stage-1 optimisation step on the tiny model; the saved LoRA loads in a stock diffusers pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from posebooth.diffusion import add_noise, diffusion_target, prior_preservation_loss
from posebooth.lora import LORA_FILE, add_unet_lora, load_unet_lora, save_unet_lora
from posebooth.models import encode_prompts, load_components
from posebooth.training import make_optimizer


def _train(comp, steps: int, lr: float):
    """A few DreamBooth LoRA steps (instance + class halves) on random latents."""
    unet = comp.unet
    params = add_unet_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    opt = make_optimizer(params, lr, 0.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    ehs = encode_prompts(comp.tokenizer, comp.text_encoder, ["a photo of sks robot", "a photo of a robot"])
    unet.train()
    for _ in range(steps):
        noisy, noise, t = add_noise(comp.noise_scheduler, latents, g)
        pred = unet(noisy, t, ehs).sample
        loss, _, _ = prior_preservation_loss(pred, diffusion_target(comp.noise_scheduler, latents, noise, t), 1.0, True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    return params, loss


def test_step_changes_only_lora_weights(tiny_sd):
    comp = load_components("embedded:tiny-sd15")
    frozen = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    te = {k: v.clone() for k, v in comp.text_encoder.state_dict().items()}
    vae = {k: v.clone() for k, v in comp.vae.state_dict().items()}
    lora_before = {n: p.detach().clone() for n, p in comp.unet.named_parameters() if "lora" in n}
    assert not lora_before  # no adapter yet
    params, loss = _train(comp, 1, 1e-3)
    assert torch.isfinite(loss)
    after = comp.unet.state_dict()
    lora_keys = [k for k in after if "lora" in k]
    assert lora_keys and all(p.requires_grad for p in params)
    assert {id(p) for p in params} == {id(p) for n, p in comp.unet.named_parameters() if "lora_" in n}
    for key, value in frozen.items():  # every base weight bit-identical (PEFT renames wrapped ones)
        new_key = (
            key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(after[new_key], value), key
    assert any(not torch.all(after[k] == 0) for k in lora_keys if "lora_B" in k)  # B left its zero init
    assert all(torch.equal(v, comp.text_encoder.state_dict()[k]) for k, v in te.items())
    assert all(torch.equal(v, comp.vae.state_dict()[k]) for k, v in vae.items())


def test_saved_lora_loads_in_stock_pipeline_and_changes_output(tiny_sd, tmp_path):
    comp = load_components("embedded:tiny-sd15")
    _train(comp, 5, 1e-2)
    path = save_unet_lora(comp.unet, tmp_path)
    assert path.name == LORA_FILE and path.exists()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a photo of sks robot", num_inference_steps=3, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    before = run()
    pipe.load_lora_weights(str(tmp_path))
    after = run()
    assert abs(after - before).max() > 1e-3

    # The weights that come back are the ones that were trained.
    trained = {k: v for k, v in comp.unet.state_dict().items() if "lora" in k}
    reloaded = load_components("embedded:tiny-sd15").unet
    load_unet_lora(reloaded, tmp_path, adapter_name="default")
    got = {k: v for k, v in reloaded.state_dict().items() if "lora" in k}
    assert trained.keys() == got.keys()
    assert all(torch.equal(trained[k], got[k]) for k in trained)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_bf16_step_keeps_trained_weights_in_fp32(tiny_sd):
    """Mixed precision on CPU: frozen weights in bf16, LoRA weights and their optimizer state in fp32."""
    from posebooth.training import autocast

    comp = load_components("embedded:tiny-sd15", precision="bf16")
    assert comp.unet.dtype == torch.bfloat16 and comp.text_encoder.dtype == torch.bfloat16
    params = add_unet_lora(comp.unet, 4, 4.0, ["to_q", "to_v"])
    assert all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    opt = make_optimizer(params, 1e-2, 0.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 4, 4, generator=g).to(torch.bfloat16)
    ehs = encode_prompts(comp.tokenizer, comp.text_encoder, ["a photo of sks robot"])
    noisy, noise, t = add_noise(comp.noise_scheduler, latents, g)
    with autocast("cpu", "bf16"):
        pred = comp.unet(noisy, t, ehs).sample
    loss, _, _ = prior_preservation_loss(pred, noise, 1.0, False)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(p.dtype == torch.float32 for p in params)


def _random_lora(folder, alpha: float, std: float, seed: int):
    """A LoRA on the tiny UNet with random (non-zero) B matrices, saved to ``folder``; returns its file."""
    comp = load_components("embedded:tiny-sd15")
    add_unet_lora(comp.unet, 4, alpha, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in comp.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std, generator=torch.Generator().manual_seed(seed))
    return save_unet_lora(comp.unet, folder)


def test_sampling_with_a_scaled_subject_lora_and_an_extra_lora(tiny_sd, tmp_path):
    """sample's pipelines: the subject LoRA at a chosen scale, plus a second (style) LoRA with its own weight."""
    from posebooth.models import load_controlnet
    from posebooth.subject import trained_pipelines

    _random_lora(tmp_path / "stage1", alpha=4.0, std=0.2, seed=1)
    style = _random_lora(tmp_path / "style", alpha=4.0, std=0.2, seed=2)
    load_controlnet("embedded:tiny-sd15-openpose").save_pretrained(tmp_path / "stage2" / "controlnet")

    def image(scale, extras):
        comp = load_components("embedded:tiny-sd15")
        _, free = trained_pipelines(comp, str(tmp_path / "stage1"), str(tmp_path / "stage2"), "ddim", "cpu",
                                    "fp32", False, scale, extras)  # fmt: skip
        return free("a photo of sks robot", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    from diffusers import DDIMScheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as sample.scheduler: ddim
    pipe.set_progress_bar_config(disable=True)
    base = pipe("a photo of sks robot", num_inference_steps=2, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    subject = image(1.0, [])
    assert abs(image(0.0, []) - base).max() < 1e-5  # scale 0 switches the subject off
    assert abs(subject - base).max() > 1e-3
    assert abs(image(1.0, [(str(style), 0.0)]) - subject).max() < 1e-5  # a weight-0 extra changes nothing
    assert abs(image(1.0, [(str(style), 1.0)]) - subject).max() > 1e-3  # the style LoRA (a file) is active
    with pytest.raises(FileNotFoundError, match="sample.extra_loras"):
        image(1.0, [(str(tmp_path / "nope"), 1.0)])
