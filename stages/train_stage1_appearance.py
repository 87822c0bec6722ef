"""train_stage1_appearance: DreamBooth LoRA on the UNet with the class prior-preservation loss.

Reads:  params common.*, train.*; data/prepared (instance images), data/class_priors (class images).
Writes: models/stage1/ (pytorch_lora_weights.safetensors, provenance.json, README.md model card),
        metrics/train_stage1_appearance.json, plots/train_stage1_appearance/ (loss per step).
Loss (Ruiz et al. 2022): mse(ε̂(x_t, c_inst), ε) + λ · mse(ε̂(x'_t, c_class), ε'), one batch of 2B.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from tqdm import tqdm

from posebooth import config, data, outputs, provenance
from posebooth.diffusion import add_noise, diffusion_target, prior_preservation_loss
from posebooth.lora import add_unet_lora, save_unet_lora
from posebooth.models import encode_images, encode_prompts, load_components
from posebooth.training import StepLog, autocast, make_optimizer, sample_indices

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
    # The VAE and text encoder are frozen and there is no augmentation: encode once, not every step.
    instance_latents = encode_images(comp.vae, instance_pixels)  # (N, 4, R/8, R/8)
    class_latents = encode_images(comp.vae, class_pixels) if with_prior else None
    prompts = [config.fill(c.instance_prompt, c), config.fill(c.class_prompt, c)]
    instance_emb, class_emb = encode_prompts(comp.tokenizer, comp.text_encoder, prompts).chunk(2)  # (1, 77, D) each
    log.info("instance prompt %r, class prompt %r, %d instance / %d class images",
             prompts[0], prompts[1], len(instance_latents), len(class_pixels))  # fmt: skip

    params = add_unet_lora(unet, t.rank, t.alpha, t.target_modules)
    optimizer = make_optimizer(params, t.lr, t.weight_decay)
    unet.train()
    steplog = StepLog(args.metrics, args.plots)
    start = time.perf_counter()
    try:
        for _step in tqdm(range(t.steps), desc="stage 1", unit="step"):
            idx = sample_indices(len(instance_latents), t.batch_size, generator)
            latents = instance_latents[idx]  # (B, 4, h, w)
            encoder_hidden_states = instance_emb.expand(t.batch_size, -1, -1)  # (B, 77, D)
            if with_prior:  # instance half first, then the class half: (2B, ...)
                cidx = sample_indices(len(class_latents), t.batch_size, generator)
                latents = torch.cat([latents, class_latents[cidx]])
                encoder_hidden_states = torch.cat([encoder_hidden_states, class_emb.expand(t.batch_size, -1, -1)])
            noisy_latents, noise, timesteps = add_noise(scheduler, latents, generator)
            with autocast(c.device, c.precision):
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            target = diffusion_target(scheduler, latents, noise, timesteps)
            loss, instance_loss, prior_loss = prior_preservation_loss(
                model_pred, target, t.prior_loss_weight, with_prior
            )

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            steplog.log(loss=loss.item(), instance_loss=instance_loss.item(), prior_loss=prior_loss.item(),
                        grad_norm=grad_norm.item())  # fmt: skip
        if not torch.isfinite(loss):
            raise ValueError(f"stage 1 diverged: final loss {loss.item()}; lower train.lr ({t.lr})")
        steplog.summary(steps=t.steps, trainable_params=sum(p.numel() for p in params))
        with outputs.atomic_dir(args.out) as tmp:
            save_unet_lora(unet, tmp)
            outputs.write_json(tmp / "provenance.json", provenance.provenance(
                cfg.as_dict(), base_model=c.model, method="lora", trigger=prompts[0],
            ))  # fmt: skip
            (tmp / "README.md").write_text(provenance.stage1_card(c.model, prompts[0]))
        steplog.close()
    except BaseException:
        steplog.abort()
        raise
    log.info("trained %d steps in %.1f s; saved the LoRA to %s", t.steps, time.perf_counter() - start, args.out)


if __name__ == "__main__":
    outputs.run_stage(main)
