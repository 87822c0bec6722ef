"""train_stage2_pose: the OpenPose ControlNet on the subject's own (image, pose map) pairs.

MagicPose-style two-stage schedule: the identity learnt in stage 1 (UNet LoRA) and the text encoder
stay frozen; only the ControlNet learns to steer that identity into a pose.
Reads:  params common.*, train_pose.*; data/prepared, data/poses, models/stage1.
Writes: models/stage2/ (controlnet/ via save_pretrained, training_config.json),
        metrics/train_stage2_pose.json, plots/train_stage2_pose/ (loss per step).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from tqdm import tqdm

from posebooth import config, data, outputs
from posebooth.diffusion import add_noise, diffusion_target, prior_preservation_loss
from posebooth.lora import load_unet_lora
from posebooth.models import encode_images, encode_prompts, load_components, load_controlnet
from posebooth.training import StepLog, make_optimizer, sample_indices

log = logging.getLogger("train_stage2_pose")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--poses", default="data/poses")
    ap.add_argument("--stage1", default="models/stage1")
    ap.add_argument("--out", default="models/stage2")
    ap.add_argument("--metrics", default="metrics/train_stage2_pose.json")
    ap.add_argument("--plots", default="plots/train_stage2_pose")
    args = ap.parse_args()
    cfg = config.load(["common", "train_pose"])
    c, t = cfg.common, cfg.train_pose
    generator = outputs.seed_everything(c.seed)

    names, pixels, controlnet_cond = data.pose_pairs(args.prepared, args.poses, c.resolution)  # [-1,1], [0,1]
    comp = load_components(c.model, c.device)
    unet, scheduler = comp.unet, comp.noise_scheduler
    # The ControlNet first: from_unet fails on a UNet that already carries a PEFT LoRA.
    controlnet = load_controlnet(t.controlnet, unet, c.device)
    load_unet_lora(unet, args.stage1)  # the stage-1 identity, frozen
    latents_all = encode_images(comp.vae, pixels)  # (N, 4, R/8, R/8), encoded once (frozen VAE)
    prompt = config.fill(c.instance_prompt, c)
    instance_emb, empty_emb = encode_prompts(comp.tokenizer, comp.text_encoder, [prompt, ""]).chunk(2)
    controlnet_cond = controlnet_cond.to(c.device)
    log.info("%d (image, pose) pairs; prompt %r, dropped with p=%.2f", len(names), prompt, t.empty_prompt_prob)

    controlnet.requires_grad_(True)
    controlnet.train()
    params = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t.lr, weight_decay=0.0)
    steplog = StepLog(args.metrics, args.plots)
    start = time.perf_counter()
    try:
        for _step in tqdm(range(t.steps), desc="stage 2", unit="step"):
            idx = sample_indices(len(latents_all), t.batch_size, generator)
            latents = latents_all[idx]  # (B, 4, h, w)
            # Empty-prompt dropout (diffusers' train_controlnet): the pose alone must carry the layout.
            drop = (torch.rand(t.batch_size, generator=generator) < t.empty_prompt_prob).view(-1, 1, 1)
            encoder_hidden_states = torch.where(drop, empty_emb, instance_emb)  # (B, 77, D)
            noisy_latents, noise, timesteps = add_noise(scheduler, latents, generator)
            down_res, mid_res = controlnet(
                noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=controlnet_cond[idx], return_dict=False,
            )  # fmt: skip
            model_pred = unet(
                noisy_latents, timesteps, encoder_hidden_states,
                down_block_additional_residuals=down_res, mid_block_additional_residual=mid_res,
            ).sample  # fmt: skip
            target = diffusion_target(scheduler, latents, noise, timesteps)
            loss, _, _ = prior_preservation_loss(model_pred, target, 0.0, with_prior=False)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            steplog.log(loss=loss.item(), grad_norm=grad_norm.item())
        if not torch.isfinite(loss):
            raise SystemExit(f"stage 2 diverged: final loss {loss.item()}; lower train_pose.lr ({t.lr})")
        steplog.summary(steps=t.steps, pairs=len(names))
        with outputs.atomic_dir(args.out) as tmp:
            controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
            outputs.write_json(tmp / "training_config.json", {
                "base_model": c.model, "controlnet_init": t.controlnet, "stage1": args.stage1,
                "pairs": names, "params": cfg.as_dict(),
            })  # fmt: skip
        steplog.close()
    except BaseException:
        steplog.abort()
        raise
    log.info("trained %d steps in %.1f s; saved the ControlNet to %s", t.steps, time.perf_counter() - start, args.out)


if __name__ == "__main__":
    outputs.run_stage(main)
