"""train_stage1_appearance: DreamBooth LoRA on the UNet with the class prior-preservation loss.

Reads:  params common.*, train.*; data/prepared (instance images), data/class_priors (class images).
Writes: models/stage1/ (pytorch_lora_weights.safetensors, optionally the kohya-format file,
        provenance.json, README.md model card),
        metrics/train_stage1_appearance.json, plots/train_stage1_appearance/ (loss per step, and
        validation images every train.validation_every steps under per-step names).
Loss (Ruiz et al. 2022): mse(ε̂(x_t, c_inst), ε) + λ · mse(ε̂(x'_t, c_class), ε'), one batch of 2B.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from posebooth import checkpoints, config, data, outputs, provenance, training
from posebooth.diffusion import add_noise
from posebooth.generation import generate
from posebooth.identifier import check_identifier
from posebooth.lora import KOHYA_FILE, add_unet_lora, export_kohya, save_unet_lora
from posebooth.models import encode_images, encode_prompts, load_components, sd_pipeline, weights_fingerprint
from posebooth.prompts import choose_variants, instance_prompts, prompt_variants
from posebooth.training import StepLog, sample_indices

log = logging.getLogger("train_stage1_appearance")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--class-priors", default="data/class_priors")
    ap.add_argument("--out", default="models/stage1")
    ap.add_argument("--metrics", default="metrics/train_stage1_appearance.json")
    ap.add_argument("--plots", default="plots/train_stage1_appearance")
    args = ap.parse_args()
    cfg = config.load(["common", "train"])
    c, t = cfg.common, cfg.train
    generator = outputs.seed_everything(c.seed)

    _, instance_pixels = data.instance_images(args.prepared, c.resolution)  # (N, 3, R, R) in [-1, 1]
    class_pixels = data.class_images(args.class_priors, c.resolution)  # (M, 3, R, R), M may be 0
    with_prior = t.prior_loss_weight > 0
    if with_prior and len(class_pixels) == 0:
        raise ValueError(
            "train.prior_loss_weight > 0 but data/class_priors holds no images: "
            "set generate_class_priors.num_class_images >= 1, or train.prior_loss_weight: 0"
        )

    comp = load_components(c.model, c.device, c.precision)
    unet, scheduler = comp.unet, comp.noise_scheduler
    # The VAE and text encoder are frozen: latents are encoded once per image and augmentation variant
    # (as is and mirrored), prompt embeddings once, not at every step.
    instance_latents = encode_images(comp.vae, instance_pixels)  # (N, 4, R/8, R/8)
    flipped_latents = encode_images(comp.vae, instance_pixels.flip(-1)) if t.flip_prob > 0 else None
    class_latents = encode_images(comp.vae, class_pixels) if with_prior else None
    identifier = check_identifier(comp.tokenizer, c.identifier)
    for warning in identifier["warnings"]:
        log.warning("%s", warning)
    prompts = [config.fill(c.instance_prompt, c), config.fill(c.class_prompt, c)]
    templates = instance_prompts(
        t.prompt_templates or [c.instance_prompt], c.identifier, c.class_noun, t.class_word_in_prompt
    )
    variants = prompt_variants(templates, t.descriptive_words)
    variant_emb = encode_prompts(comp.tokenizer, comp.text_encoder, variants)  # (V, 77, D), encoded once
    class_emb = encode_prompts(comp.tokenizer, comp.text_encoder, prompts[1:])  # (1, 77, D)
    log.info("instance prompts %s (%d variants), class prompt %r, %d instance / %d class images",
             templates[:3], len(variants), prompts[1], len(instance_latents), len(class_pixels))  # fmt: skip

    params = add_unet_lora(unet, t.rank, t.alpha, t.target_modules)
    accelerator, unet, optimizer, lr_scheduler = training.prepare(unet, params, t, c.device, c.precision)
    unet.train()
    b = t.batch_size
    # Resumable: the whole training state is checkpointed outside the outputs (see posebooth/checkpoints.py).
    trainable = {n: p for n, p in accelerator.unwrap_model(unet).named_parameters() if p.requires_grad}
    ckpt = checkpoints.checkpoint_dir(
        "train_stage1_appearance",
        checkpoints.fingerprint(
            cfg.as_dict() | {"model": weights_fingerprint(c.model)}, [args.prepared, args.class_priors]
        ),
    )
    first, history = 0, []
    if (ckpt / "state.json").exists():
        first, history = checkpoints.load(ckpt, trainable, optimizer, lr_scheduler, generator)
        log.info("resuming from the checkpoint after step %d in %s", first, ckpt)
    steplog = StepLog(args.metrics, args.plots, history, images=ckpt / "images")
    validation = sd_pipeline(replace(comp, unet=accelerator.unwrap_model(unet)), "ddim")  # shares the modules
    validation_prompts = [config.fill(p, c) for p in t.validation_prompts]
    start = time.perf_counter()
    try:
        for step in tqdm(range(first, t.steps), desc="stage 1", unit="step", initial=first, total=t.steps):
            totals = torch.zeros(3)
            for _micro in range(t.gradient_accumulation_steps):
                with accelerator.accumulate(unet):
                    idx = sample_indices(len(instance_latents), b, generator)
                    latents = instance_latents[idx]  # (B, 4, h, w)
                    if flipped_latents is not None:
                        flip = (torch.rand(b, generator=generator) < t.flip_prob).view(-1, 1, 1, 1)
                        latents = torch.where(flip, flipped_latents[idx], latents)
                    chosen = choose_variants(b, len(templates), len(t.descriptive_words), t.descriptive_prob, generator)
                    encoder_hidden_states = variant_emb[chosen]  # (B, 77, D)
                    if with_prior:  # instance half first, then the class half: (2B, ...)
                        cidx = sample_indices(len(class_latents), b, generator)
                        latents = torch.cat([latents, class_latents[cidx]])
                        encoder_hidden_states = torch.cat([encoder_hidden_states, class_emb.expand(b, -1, -1)])
                    noisy_latents, noise, timesteps = add_noise(scheduler, latents, generator, t.noise_offset)
                    with accelerator.autocast():
                        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
                    step_losses, grad_norm = training.loss_and_step(
                        accelerator, scheduler, model_pred, latents, noise, timesteps, with_prior, t,
                        params, optimizer, lr_scheduler,
                    )  # fmt: skip
                    totals += step_losses
            if t.validation_every and (step + 1) % t.validation_every == 0:  # fixed seeds: comparable across steps
                unet.eval()
                for i, prompt in enumerate(validation_prompts):
                    (image,) = generate(validation, prompt, [c.seed], steps=t.validation_steps, guidance_scale=5.0,
                                        resolution=c.resolution)  # fmt: skip
                    steplog.image(f"validation/{i}_step_{step + 1:05d}.png", image)
                unet.train()
            training.end_of_step(steplog, step, totals, grad_norm, lr_scheduler, t, lambda done: checkpoints.save(
                ckpt, done, trainable, optimizer, lr_scheduler, generator, steplog.history, steplog.images_dir))  # fmt: skip
        steplog.summary(steps=t.steps, trainable_params=sum(p.numel() for p in params),
                        identifier_tokens=len(identifier["tokens"]))  # fmt: skip
        with outputs.atomic_dir(args.out) as tmp:
            lora_file = save_unet_lora(accelerator.unwrap_model(unet), tmp)
            if t.export_kohya:
                export_kohya(lora_file, tmp / KOHYA_FILE, t.alpha)
            outputs.write_json(tmp / "provenance.json", provenance.provenance(
                cfg.as_dict(), base_model=c.model, method="lora", trigger=templates[0], identifier_check=identifier,
            ))  # fmt: skip
            (tmp / "README.md").write_text(provenance.stage1_card(c.model, templates[0]))
        steplog.close()
        checkpoints.remove(ckpt)
    except BaseException:
        steplog.abort()
        raise
    log.info("trained %d steps in %.1f s; saved the LoRA to %s", t.steps, time.perf_counter() - start, args.out)


if __name__ == "__main__":
    outputs.run_stage(main)
