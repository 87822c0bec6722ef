"""train_stage2_pose: the OpenPose ControlNet on the subject's own (image, pose map) pairs.

MagicPose-style two-stage schedule: the identity learnt in stage 1 and the text encoder stay frozen;
only the ControlNet (``train_pose.mode``: all of it, or a LoRA on it) learns to steer that identity into
a pose. ``train_unet_lora`` lets the stage-1 UNet LoRA go on learning as well, at ``unet_lr``. When the class images have
poses too, (class image, its pose, class prompt) pairs add a prior-preservation term weighted by
``train_pose.prior_loss_weight``, so the ControlNet keeps working for the class, not only the subject.
Reads:  params common.*, train_pose.*; data/prepared, data/class_priors, data/poses, models/stage1.
Writes: models/stage2/ (controlnet/ via save_pretrained, or controlnet_lora/ with the base ControlNet
        named in controlnet_base.json or saved in controlnet_base/; unet_lora/ with train_unet_lora;
        exports/ for AUTOMATIC1111/Forge and ComfyUI; provenance.json, README.md model card),
        metrics/train_stage2_pose.json, plots/train_stage2_pose/ (loss per step).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
from tqdm import tqdm

from posebooth import buckets, checkpoints, config, data, exports, outputs, provenance, subject, training
from posebooth.diffusion import add_noise
from posebooth.lora import adapter_parameters, add_controlnet_lora, save_controlnet_lora, save_unet_lora
from posebooth.models import (
    DTYPES,
    added_conditions,
    check_controlnet_fits,
    drop_local_paths,
    encode_posterior,
    encode_text,
    load_components,
    load_controlnet,
    sd_pipeline,
    weights_fingerprint,
)  # fmt: skip
from posebooth.training import StepLog

log = logging.getLogger("train_stage2_pose")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--class-priors", default="data/class_priors")
    ap.add_argument("--poses", default="data/poses")
    ap.add_argument("--stage1", default="models/stage1")
    ap.add_argument("--out", default="models/stage2")
    ap.add_argument("--metrics", default="metrics/train_stage2_pose.json")
    ap.add_argument("--plots", default="plots/train_stage2_pose")
    args = ap.parse_args()
    outputs.claim("train_stage2_pose", args.out, args.metrics, args.plots)
    cfg = config.load(["common", "train_pose"])
    c, t = cfg.common, cfg.train_pose
    generator = outputs.seed_everything(c.seed, c.deterministic)

    dirs = {"instance": args.prepared, "class": args.class_priors}
    # The instance pairs by aspect-ratio bucket (prepare_images.buckets; without: one bucket of R x R squares):
    # pixels (n, 3, h, w) in [-1, 1] per bucket, its pose maps in [0, 1] in the bucket's conds.
    names, pair_buckets, bucket_pixels = data.pose_pair_buckets(args.poses, args.prepared, c.resolution)
    if not names:
        raise ValueError(f"{args.poses}/report.json: no instance image has a usable pose; see extract_poses")
    class_names, class_pixels, class_conds = data.pose_pairs(args.poses, dirs, c.resolution, "class")
    with_prior = t.prior_loss_weight > 0 and len(class_names) > 0
    if not with_prior:
        log.info(
            "training on instance pairs only (%s)",
            "no class image has a pose" if not class_names else "prior_loss_weight is 0",
        )

    comp = load_components(
        subject.base_model(args.stage1, c.model), c.device, c.precision, c.vae, c.model_config
    )  # full: stage 1's own
    unet, scheduler = comp.unet, comp.noise_scheduler
    buckets.check_vae_fit(pair_buckets, comp.vae, c.resolution)
    weight_dtype = DTYPES[c.precision]  # of the frozen weights
    # The ControlNet first: from_unet fails on a UNet that already carries a PEFT LoRA. It trains in fp32.
    # (mode lora: the frozen base runs in common.precision, its LoRA stays fp32; full: all of it trains in fp32)
    # from_unet copies the base UNet's weights as stored (fp32), not the half-precision ones loaded here.
    controlnet = load_controlnet(
        t.controlnet, unet, c.device, c.precision if t.mode == "lora" else "fp32",
        base=subject.base_model(args.stage1, c.model),
        base_config=c.model_config,
    )  # fmt: skip
    check_controlnet_fits(controlnet, unet, "train_pose.controlnet")
    subject.load_into(sd_pipeline(comp, "ddim"), args.stage1)  # the stage-1 identity (UNet, text encoder)...
    unet.requires_grad_(False)  # ... frozen
    for encoder in comp.text_encoders:
        encoder.requires_grad_(False)
    # Encoded once (frozen VAE), in chunks of train_pose.vae_batch_size: posterior mean and std (n, 4, h/8, w/8)
    # each; every step draws its latents from them. Class pairs: centre-cropped and resized to each bucket once.
    for g, pixels in zip(pair_buckets, bucket_pixels, strict=True):
        g.latents, g.conds = encode_posterior(comp.vae, pixels, t.vae_batch_size), g.conds.to(c.device)
        if with_prior:
            g.class_latents = encode_posterior(comp.vae, buckets.fit_pixels(class_pixels, g.size), t.vae_batch_size)
            g.class_conds = buckets.fit_pixels(class_conds, g.size).to(c.device)
    prompts = [config.fill(c.instance_prompt, c), config.fill(c.class_prompt, c), ""]
    embeddings, pooled_all = encode_text(comp, prompts)  # (3, 77, D); SDXL: pooled (3, P), else None
    instance_emb, class_emb, empty_emb = embeddings.chunk(3)
    if c.device != "cpu":  # the text encoders' work is done: free their GPU memory (SDXL's take 1.6 GB in fp16)
        for encoder in comp.text_encoders:
            encoder.to("cpu")
    # SDXL's added conditioning: pooled prompt embeddings and time ids (instance photos' recorded sizes and
    # crops; class images' generated size). Nothing for SD 1.5.
    if comp.xl:
        instance_pooled, class_pooled, empty_pooled = pooled_all.chunk(3)
        for g in pair_buckets:  # (n, 6) and (B, 6)
            g.time_ids = data.time_ids(args.prepared, [names[i] for i in g.index], c.resolution)
            g.class_time_ids = buckets.generated_time_ids(t.batch_size, c.resolution, g.size)
    log.info("%d instance and %d class (image, pose) pairs; prompt %r dropped with p=%.2f",
             len(names), len(class_names) if with_prior else 0, prompts[0], t.empty_prompt_prob)  # fmt: skip

    base = None
    if t.mode == "lora":
        base = copy.deepcopy(controlnet) if t.controlnet == "from_unet" else None
        params = add_controlnet_lora(controlnet, t.rank, t.alpha)
    else:
        controlnet.requires_grad_(True)
        params = [p for p in controlnet.parameters() if p.requires_grad]
    groups, models = [{"params": params, "lr": t.lr}], [controlnet]
    if t.train_unet_lora:  # the stage-1 LoRA (adapter "subject") learns on
        unet_lora = adapter_parameters(unet, "subject")  # (any train.adapter: LoRA, DoRA, LoHa, LoKr)
        if not unet_lora:
            raise ValueError(
                f"train_pose.train_unet_lora: {args.stage1} holds no UNet LoRA (train.method lora or momentum_ti)"
            )
        for p in unet_lora:
            p.requires_grad_(True)
            p.data = p.data.float()
        groups.append({"params": unet_lora, "lr": t.unet_lr})
        models.append(unet)
    tracker_root = training.tracker_dir("train_stage2_pose")  # TensorBoard / W&B (common.trackers)
    accelerator, models, optimizer, lr_scheduler = training.prepare(
        models, groups, t, c.device, c.precision, trackers=c.trackers, tracker_root=tracker_root
    )
    controlnet, unet = models[0], (models[1] if t.train_unet_lora else unet)
    params = [p for g in groups for p in g["params"]]
    for model in models:
        model.train()
    b = t.batch_size
    # Resumable: the whole training state is checkpointed outside the outputs (see posebooth/checkpoints.py).
    trainable = {
        f"controlnet.{n}": p for n, p in accelerator.unwrap_model(controlnet).named_parameters() if p.requires_grad
    }
    trainable |= {f"unet.{n}": p for n, p in comp.unet.named_parameters() if p.requires_grad}
    ckpt = checkpoints.checkpoint_dir(
        "train_stage2_pose",
        checkpoints.fingerprint(
            cfg.as_dict() | {"model": weights_fingerprint(c.model)},
            [args.prepared, args.class_priors, args.poses, args.stage1],
        ),
    )
    weights = outputs.nbytes(trainable.values())  # checkpoints: weights and two Adam moments (and the EMA)
    saved = outputs.nbytes(controlnet) if t.mode == "full" or base is not None else weights
    outputs.require_free_space({ckpt: (4 if t.ema_decay else 3) * weights, args.out: saved}, "train_stage2_pose")
    ema = training.make_ema(trainable.values(), t.ema_decay)  # (train_pose.ema_decay: 0 = None)
    first, history = 0, []
    if (ckpt / "state.json").exists():
        first, history = checkpoints.load(ckpt, trainable, optimizer, lr_scheduler, generator, accelerator.scaler, ema)
        log.info("resuming from the checkpoint after step %d in %s", first, ckpt)
    steplog = (
        StepLog(args.metrics, args.plots, history, monitor_system=c.monitor_system)
        if accelerator.is_main_process
        else training.NullLog()
    )
    steplog.track(accelerator, "train_stage2_pose", cfg.as_dict())  # TensorBoard / W&B (common.trackers)
    shard = training.Shard(accelerator)  # this process's slice of each global batch
    if shard.world > 1:
        log.info("%d processes (accelerate launch): %d pair(s) per process and micro-step", shard.world, b)

    def save_checkpoint(done: int) -> None:
        training.on_main_process(accelerator, lambda: checkpoints.save(
            ckpt, done, trainable, optimizer, lr_scheduler, generator, steplog.history, scaler=accelerator.scaler,
            ema=ema,
        ))  # fmt: skip

    start = time.perf_counter()
    try:
        for step in tqdm(range(first, t.steps), desc="stage 2", unit="step", initial=first, total=t.steps):
            totals = torch.zeros(3)
            for _micro in range(t.gradient_accumulation_steps):
                with accelerator.accumulate(*models):
                    bucket = buckets.draw(pair_buckets, generator)  # the batch's size (one bucket: no draw)
                    idx = shard.indices(len(bucket), b, generator)  # into the bucket's pairs
                    latents = bucket.latents[idx].sample(generator, shard.rank_world)  # (B, 4, h, w)
                    controlnet_cond = bucket.conds[idx]  # (B, 3, H, W) in [0, 1]
                    encoder_hidden_states = instance_emb.expand(b, -1, -1)  # (B, 77, D)
                    pooled = instance_pooled.expand(b, -1) if comp.xl else None  # SDXL: (B, P)
                    ids_time = bucket.time_ids[idx] if comp.xl else None  # SDXL: (B, 6)
                    if with_prior:  # instance half first, then (class image, its pose, class prompt): (2B, ...)
                        cidx = shard.indices(len(class_names), b, generator)
                        latents = torch.cat([latents, bucket.class_latents[cidx].sample(generator, shard.rank_world)])
                        controlnet_cond = torch.cat([controlnet_cond, bucket.class_conds[cidx]])
                        encoder_hidden_states = torch.cat([encoder_hidden_states, class_emb.expand(b, -1, -1)])
                        if comp.xl:
                            pooled = torch.cat([pooled, class_pooled.expand(b, -1)])
                            ids_time = torch.cat([ids_time, bucket.class_time_ids])
                    # Empty-prompt dropout (diffusers' train_controlnet): the pose alone must carry the layout.
                    drop = shard.rand(len(latents), generator) < t.empty_prompt_prob
                    encoder_hidden_states = torch.where(
                        drop.view(-1, 1, 1).to(c.device), empty_emb, encoder_hidden_states
                    )
                    if comp.xl:
                        pooled = torch.where(drop.view(-1, 1).to(c.device), empty_pooled, pooled)
                    extra = added_conditions(pooled, ids_time)  # SDXL's added_cond_kwargs, for both networks
                    noisy_latents, noise, timesteps = add_noise(
                        scheduler, latents, generator, t.noise_offset, shard.rank_world
                    )
                    with accelerator.autocast():
                        down_res, mid_res = controlnet(
                            noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                            controlnet_cond=controlnet_cond, return_dict=False, **extra,
                        )  # fmt: skip
                        # the residuals in the frozen UNet's precision, as diffusers' train_controlnet.py passes them
                        # (an fp32 ControlNet's residuals would meet bf16/fp16 weights in the UNet's norms)
                        model_pred = unet(
                            noisy_latents, timesteps, encoder_hidden_states,
                            down_block_additional_residuals=[r.to(weight_dtype) for r in down_res],
                            mid_block_additional_residual=mid_res.to(weight_dtype), **extra,
                        ).sample  # fmt: skip
                    step_losses, grad_norm = training.loss_and_step(
                        accelerator, scheduler, model_pred, latents, noise, timesteps, with_prior, t,
                        params, optimizer, lr_scheduler,
                    )  # fmt: skip
                    if ema is not None and accelerator.sync_gradients:
                        ema.step(trainable.values())
                    totals += step_losses
            totals = training.reduce_losses(accelerator, totals)  # the mean over processes
            training.end_of_step(steplog, step, totals, grad_norm, lr_scheduler, t, save_checkpoint)
        if ema is not None:  # what is saved and exported is the EMA
            ema.copy_to(trainable.values())
        steplog.summary(steps=t.steps, pairs=len(names), class_pairs=len(class_names) if with_prior else 0)

        def write_outputs() -> None:
            with outputs.atomic_dir(args.out) as tmp:
                trained = accelerator.unwrap_model(controlnet)
                if t.mode == "full":
                    trained.save_pretrained(tmp / "controlnet", safe_serialization=True)
                else:
                    save_controlnet_lora(trained, tmp / "controlnet_lora")
                    if base is not None:  # made here from the UNet, so not loadable by name: saved beside
                        base.save_pretrained(tmp / "controlnet_base", safe_serialization=True)
                    else:
                        outputs.write_json(tmp / "controlnet_base.json", {"controlnet": t.controlnet})
                if t.train_unet_lora:
                    save_unet_lora(comp.unet, tmp / "unet_lora", adapter="subject")
                if t.export:  # exports/: what AUTOMATIC1111/Forge and ComfyUI load (posebooth/exports.py)
                    exports.write_stage2(tmp, args.stage1, tmp / "exports", exports.subject_of(args.stage1),
                                         dict(comp.unet.config), controlnet=trained,
                                         base=exports.base_weights_of(comp))  # fmt: skip
                outputs.write_json(tmp / "provenance.json", provenance.provenance(
                    cfg.as_dict(), base_model=c.model, trigger=prompts[0], controlnet_init=t.controlnet,
                    stage1=args.stage1, pairs=names, class_pairs=class_names if with_prior else [],
                ))  # fmt: skip
                (tmp / "README.md").write_text(
                    provenance.stage2_card(
                        c.model,
                        prompts[0],
                        comp.xl,
                        None
                        if t.mode == "full"
                        else ("models/stage2/controlnet_base" if base is not None else t.controlnet),
                        stage1=args.stage1,
                    )
                )  # fmt: skip)
                drop_local_paths(tmp)
            steplog.close()
            checkpoints.remove(ckpt)

        training.on_main_process(accelerator, write_outputs)
    except BaseException:
        steplog.abort()
        raise
    log.info("trained %d steps in %.1f s; saved the ControlNet to %s", t.steps, time.perf_counter() - start, args.out)


if __name__ == "__main__":
    outputs.run_stage(main)
