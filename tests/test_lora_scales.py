"""LoRAs at sampling time, through the code sample runs (``subject.trained_pipelines``): the subject's LoRA at
intermediate scales, stage 2's continued UNet LoRA in place of stage 1's, and an SD 1.5 LoRA with a text-encoder
part that round-trips through a stock ``StableDiffusionPipeline``."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from posebooth import methods, subject
from posebooth.lora import LORA_FILE, save_unet_lora
from posebooth.models import encode_prompts, load_components, load_controlnet, sd_pipeline
from tests.test_lora import _random_lora
from tests.test_methods import train_cfg

PROMPT = "a photo of sks robot"
SIZE = 32


def image(pipe) -> np.ndarray:
    """One image (H, W, 3) in [0, 1], seed 0, as sample calls its pipelines (DDIM, CFG 6)."""
    return pipe(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, guidance_scale=6.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # fmt: skip


def stock(folder) -> StableDiffusionPipeline:
    """A stock SD 1.5 pipeline from ``folder`` with sample's scheduler (ddim)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage2_folder(folder):
    """models/stage2 with the embedded ControlNet (sample needs one; the pose-free pipeline does not use it)."""
    load_controlnet("embedded:tiny-sd15-openpose").save_pretrained(folder / "controlnet", safe_serialization=True)
    return folder


def pipelines(stage1, stage2, scale: float = 1.0):
    """sample's ``(posed, free)`` pipelines on freshly loaded components."""
    comp = load_components("embedded:tiny-sd15")
    return subject.trained_pipelines(comp, str(stage1), str(stage2), "ddim", "cpu", "fp32", False, scale)


def test_the_subject_lora_scale_is_linear_in_every_lora_layer(tiny_sd, tmp_path):
    """``sample.subject_lora_scale`` s: every LoRA layer of the UNet gives ``W x + s · ΔW x`` for s in
    {0, 0.5, 1, 1.5}. (The whole UNet is not linear in s: the LoRAs on to_q and to_k meet inside the
    softmax, and layers compose; its output at s = 0 is the base UNet's.)"""
    _random_lora(tmp_path / "stage1", alpha=4.0, std=0.2, seed=1)
    stage2 = stage2_folder(tmp_path / "stage2")
    outs = {}
    for scale in (0.0, 0.5, 1.0, 1.5):
        unet = pipelines(tmp_path / "stage1", stage2, scale)[1].unet
        layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            outs[scale] = {n: m(torch.randn(2, 3, m.in_features, generator=g)) for n, m in layers.items()}
    assert len(outs[1.0]) == 4 * 2 * 4  # 4 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    base, delta = outs[0.0], {n: outs[1.0][n] - outs[0.0][n] for n in outs[0.0]}
    assert all(d.abs().max() > 1e-3 for d in delta.values())
    for scale in (0.5, 1.5):
        for name in base:
            torch.testing.assert_close(outs[scale][name], base[name] + scale * delta[name], rtol=0, atol=1e-5)

    stock_unet = load_components("embedded:tiny-sd15").unet  # the UNet at s = 0 is the base UNet
    x, ehs = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32)
    with torch.no_grad():
        at_zero = pipelines(tmp_path / "stage1", stage2, 0.0)[1].unet(x, 500, ehs).sample
        torch.testing.assert_close(at_zero, stock_unet(x, 500, ehs).sample, rtol=0, atol=1e-6)


def test_stage2s_unet_lora_replaces_stage1s_at_sampling(tiny_sd, tmp_path):
    """``train_pose.train_unet_lora``: stage 2 saves the subject LoRA it went on training in
    models/stage2/unet_lora; sample uses it instead of stage 1's, at the subject's scale."""
    _random_lora(tmp_path / "stage1", alpha=4.0, std=0.2, seed=1)
    plain = stage2_folder(tmp_path / "plain")
    swapped = stage2_folder(tmp_path / "swapped")
    comp = load_components("embedded:tiny-sd15")  # as train_stage2_pose loads the identity and trains it on
    subject.load_into(sd_pipeline(comp, "ddim"), tmp_path / "stage1")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in comp.unet.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_unet_lora(comp.unet, swapped / "unet_lora", adapter="subject")

    by_stage1 = image(pipelines(tmp_path / "stage1", plain)[1])
    by_stage2 = image(pipelines(tmp_path / "stage1", swapped)[1])
    manual = stock(tiny_sd)
    manual.load_lora_weights(str(swapped / "unet_lora"), adapter_name="stage2")
    assert np.abs(by_stage2 - by_stage1).max() > 1e-2
    np.testing.assert_allclose(by_stage2, image(manual), rtol=0, atol=1e-5)

    manual.set_adapters(["stage2"], [0.5])  # the subject's scale applies to stage 2's LoRA
    np.testing.assert_allclose(image(pipelines(tmp_path / "stage1", swapped, 0.5)[1]), image(manual), rtol=0,
                               atol=1e-5)  # fmt: skip


def test_an_sd15_text_encoder_lora_round_trips_through_a_stock_pipeline(tiny_sd, tmp_path):
    """``train.method: lora`` with ``train_text_encoder``: stage 1's setup, random non-zero LoRA B matrices on
    the UNet and the text encoder, stage 1's save; a stock ``load_lora_weights`` finds the text-encoder keys,
    encodes the prompt as the trained text encoder does, and makes the trained model's images, which are
    sample's images too."""
    t = train_cfg(method="lora", train_text_encoder=True)
    comp = load_components("embedded:tiny-sd15")
    tr = methods.setup("lora", comp, t, "sks", "robot")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tr.named.items():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=g)
    assert {n.split(".")[0] for n in tr.named if "lora_B" in n} == {"unet", "text_encoder"}
    (path,) = methods.save("lora", comp, tmp_path / "stage1", t, "sks")
    assert path.name == LORA_FILE
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    te_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert len(te_keys) == 2 * 4 * 2  # two layers x (q, k, v, out) x (A, B)
    assert len(keys) == len(te_keys) + 32 * 2  # and the UNet's 32 layers x (A, B)
    trained_ehs = encode_prompts(comp.tokenizer, comp.text_encoder, [PROMPT])
    trained = image(sd_pipeline(comp, "ddim"))

    pipe = stock(tiny_sd)
    base, base_ehs = image(pipe), pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.load_lora_weights(str(tmp_path / "stage1"))
    loaded_ehs = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert (loaded_ehs - base_ehs).abs().max() > 1e-2  # the text-encoder LoRA changes the prompt's embedding
    torch.testing.assert_close(loaded_ehs, trained_ehs, rtol=0, atol=1e-5)
    loaded = image(pipe)
    assert np.abs(loaded - base).max() > 1e-2
    np.testing.assert_allclose(loaded, trained, rtol=0, atol=1e-4)
    sampled = image(pipelines(tmp_path / "stage1", stage2_folder(tmp_path / "stage2"))[1])
    np.testing.assert_allclose(sampled, trained, rtol=0, atol=1e-4)
