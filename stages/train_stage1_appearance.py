"""train_stage1_appearance: learn the subject's appearance, with the class prior-preservation loss.

``train.method`` chooses what learns (posebooth/methods.py): a UNet LoRA (optionally a text-encoder LoRA),
the full UNet (optionally the text encoder), Custom Diffusion's cross-attention K/V, textual inversion,
or momentum textual inversion on top of a DreamBooth LoRA (two phases).
Reads:  params common.*, train.*; data/prepared (instance images and their captions), data/class_priors
        (class images).
Writes: models/stage1/ (what the method learned, in the formats stock diffusers loads; optionally the
        exports/ for AUTOMATIC1111/Forge and ComfyUI; provenance.json; README.md model card),
        metrics/train_stage1_appearance.json, plots/train_stage1_appearance/ (loss per step, and
        validation images every train.validation_every steps under per-step names).
Loss (Ruiz et al. 2022): mse(ε̂(x_t, c_inst), ε) + λ · mse(ε̂(x'_t, c_class), ε'), one batch of 2B; the
instance term is weighted up inside face boxes with train.face_loss_weight.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from tqdm import tqdm

from posebooth import augment, buckets, checkpoints, config, data, exports, methods, outputs, provenance, training
from posebooth.diffusion import add_noise
from posebooth.generation import generate
from posebooth.identifier import check_identifier
from posebooth.models import (
    added_conditions,
    drop_local_paths,
    encode_ids,
    encode_posterior,
    encode_text,
    is_xl,
    load_components,
    sd_pipeline,
    tokenize,
    weights_fingerprint,
)
from posebooth.prompts import (
    caption_dropout,
    caption_prompts,
    caption_rows,
    choose_variants,
    instance_prompts,
    prompt_variants,
    with_captions,
)
from posebooth.training import StepLog

log = logging.getLogger("train_stage1_appearance")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--class-priors", default="data/class_priors")
    ap.add_argument("--out", default="models/stage1")
    ap.add_argument("--metrics", default="metrics/train_stage1_appearance.json")
    ap.add_argument("--plots", default="plots/train_stage1_appearance")
    args = ap.parse_args()
    outputs.claim("train_stage1_appearance", args.out, args.metrics, args.plots)
    cfg = config.load(["common", "train"])
    c, t = cfg.common, cfg.train
    generator = outputs.seed_everything(c.seed, c.deterministic)
    xl = is_xl(c.model)  # SDXL: two text encoders, pooled embedding and time ids (posebooth/models.py)
    methods.check_supported(t.method, xl, c.model)

    # The photos by aspect-ratio bucket (prepare_images.buckets; without: one bucket of R x R squares), and
    # each bucket's pixels (n, 3, h, w) in [-1, 1].
    names, photo_buckets, bucket_pixels = data.instance_buckets(args.prepared, c.resolution)
    class_pixels = data.class_images(args.class_priors, c.resolution)  # (M, 3, R, R), M may be 0
    with_prior = t.prior_loss_weight > 0
    if with_prior and len(class_pixels) == 0:
        raise ValueError(
            "train.prior_loss_weight > 0 but data/class_priors holds no images: "
            "set generate_class_priors.num_class_images >= 1, or train.prior_loss_weight: 0"
        )
    # Training views, made once from the seed, per bucket: each photo and train.random_crops zoomed crops of it,
    # with its face box (train.face_loss_weight) and its window in the photo (SDXL's crop conditioning).
    faces, views, view_boxes, windows = [], [], [], []
    for pixels in bucket_pixels:
        found_faces = augment.face_boxes(pixels) if t.face_loss_weight > 0 else [None] * len(pixels)
        bucket_views, boxes, bucket_windows = augment.crop_views(
            pixels, found_faces, t.random_crops, t.random_crop_scale, generator
        )  # (n, K, 3, h, w)
        faces += found_faces
        views.append(bucket_views)
        view_boxes.append(boxes)
        windows.append(bucket_windows)
    if t.face_loss_weight > 0:
        found = sum(b is not None for b in faces)
        log.info("face-region loss: a face in %d of %d photos%s", found, len(faces),
                 "" if found else "; none found, so the face term is off (train.face_loss_weight has no effect)")  # fmt: skip
    n_images, n_views = len(names), views[0].shape[1]
    use_loss_maps = any(box is not None for boxes in view_boxes for per_photo in boxes for box in per_photo)

    comp = load_components(c.model, c.device, c.precision, c.vae, c.model_config)
    unet, text_encoder, scheduler = comp.unet, comp.text_encoder, comp.noise_scheduler
    buckets.check_vae_fit(photo_buckets, comp.vae, c.resolution)
    # The VAE is frozen: each view and mirror image is encoded once (posterior mean and std, in chunks of
    # train.vae_batch_size), and every step draws its latents from those posteriors; the class images are
    # centre-cropped and resized to each bucket's size once (posebooth/buckets.py).
    for g, bucket_views, boxes, bucket_windows in zip(photo_buckets, views, view_boxes, windows, strict=True):
        flat = bucket_views.flatten(0, 1)  # (n * K, 3, h, w)
        g.latents = encode_posterior(comp.vae, flat, t.vae_batch_size).unflatten((len(g), n_views))
        g.flipped = (
            encode_posterior(comp.vae, flat.flip(-1), t.vae_batch_size).unflatten((len(g), n_views))
            if t.flip_prob > 0 else None
        )  # fmt: skip
        if with_prior:  # (M, 3, h, w)
            g.class_latents = encode_posterior(comp.vae, buckets.fit_pixels(class_pixels, g.size), t.vae_batch_size)
        latent_size = (g.latents.mean.shape[-1], g.latents.mean.shape[-2])
        masks = torch.stack([torch.stack([augment.box_mask(b, g.size, latent_size) for b in bs]) for bs in boxes])
        g.loss_maps = (1 + t.face_loss_weight * masks).to(c.device)  # (n, K, 1, h, w): 1 outside faces
        # SDXL's size and crop conditioning: of each view, as it is and mirrored, from the photo's original size
        # and crop recorded by prepare_images (n, K, 2, 6); class images: their generated size, fitted to the
        # bucket (B, 6). None for SD 1.5.
        bucket_names = [names[i] for i in g.index]
        g.time_ids = data.view_time_ids(args.prepared, bucket_names, c.resolution, bucket_windows) if xl else None
        g.class_time_ids = buckets.generated_time_ids(t.batch_size, c.resolution, g.size) if xl else None
    if len(photo_buckets) > 1:
        log.info("aspect-ratio buckets (width x height: photos): %s",
                 ", ".join(f"{g.size[0]}x{g.size[1]}: {len(g)}" for g in photo_buckets))  # fmt: skip
    identifier = check_identifier(comp.tokenizer, c.identifier)
    for warning in identifier["warnings"]:
        log.warning("%s", warning)
    templates = instance_prompts(
        t.prompt_templates or [c.instance_prompt], c.identifier, c.class_noun, t.class_word_in_prompt
    )
    # Photos with a caption (photo.txt) also get train.caption_template with each template: after the variants.
    captions = data.instance_captions(args.prepared, names)  # one per photo, or None
    rows = caption_rows(captions)  # (N,) each photo's row of captioned prompts, -1 without a caption
    captioned = caption_prompts(templates, [x for x in captions if x is not None], t.caption_template,
                                c.identifier, c.class_noun, t.class_word_in_prompt)  # fmt: skip
    variants = prompt_variants(templates, t.descriptive_words) + captioned
    if captioned:
        log.info("captions for %d of %d photos, e.g. %r; dropped with p=%.2f",
                 int((rows >= 0).sum()), len(rows), captioned[0], t.caption_dropout)  # fmt: skip
    class_prompt = config.fill(c.class_prompt, c)
    log.info("method %s; instance prompts %s (%d variants), class prompt %r, %d instance (%d views) / %d class images",
             t.method, templates[:3], len(variants), class_prompt, n_images, n_views, len(class_pixels))  # fmt: skip

    b = t.batch_size
    phases = methods.phases(t.method)
    # Resumable: the whole training state is checkpointed outside the outputs (see posebooth/checkpoints.py),
    # one folder per phase; the latest one holds the values logged so far.
    ckpt_root = checkpoints.checkpoint_dir(
        "train_stage1_appearance",
        checkpoints.fingerprint(
            cfg.as_dict() | {"model": weights_fingerprint(c.model)}, [args.prepared, args.class_priors]
        ),
    )
    ckpts = {phase: ckpt_root / phase for phase in phases}
    latest = next((ckpts[p] for p in reversed(phases) if (ckpts[p] / "state.json").exists()), None)
    steplog = (  # under `accelerate launch` only the main process logs and writes
        StepLog(args.metrics, args.plots, checkpoints.history(latest) if latest else [],
                images=latest / "images" if latest else None, monitor_system=c.monitor_system)
        if training.is_main_process() else training.NullLog()
    )  # fmt: skip
    validation_prompts = [config.fill(p, c) for p in t.validation_prompts]
    tracker_root = training.tracker_dir("train_stage1_appearance")  # TensorBoard / W&B (common.trackers)
    start, done, trainable_count = time.perf_counter(), 0, 0
    try:
        for phase in phases:
            steps = methods.phase_steps(phase, t)
            tr = methods.setup(phase, comp, t, c.identifier, c.class_noun)  # may add a token
            trainable_count += tr.learned_values
            # Checkpoints hold weights, two Adam moments (and the EMA); the output, the adapter (or the whole pipeline).
            weights = outputs.nbytes(tr.named.values())
            saved = outputs.nbytes(unet, text_encoder, comp.vae) if phase == "full" else weights
            copies = 4 if t.ema_decay else 3
            outputs.require_free_space({ckpt_root: copies * weights, args.out: saved}, "train_stage1_appearance")
            tr.ema = ema = training.make_ema(tr.named.values(), t.ema_decay)  # (train.ema_decay: 0 = None)
            models = [unet, *comp.text_encoders] if tr.text_encoder_trains else [unet]
            accelerator, models, optimizer, lr_scheduler = training.prepare(
                models, tr.groups, t, c.device, c.precision, steps, c.trackers, tracker_root
            )
            steplog.track(accelerator, "train_stage1_appearance", cfg.as_dict())  # the first phase's, once
            shard = training.Shard(accelerator)  # this process's slice of each global batch
            if shard.world > 1:
                log.info("%s on %d processes (accelerate launch): %d instance image(s) per process and micro-step",
                         phase, shard.world, b)  # fmt: skip
            tokens = tokenize(comp, variants + [class_prompt])  # per tokenizer: (V + 1, 77)
            variant_ids, class_ids = [ids[:-1] for ids in tokens], [ids[-1:] for ids in tokens]
            if not tr.text_encoder_trains:  # frozen text encoders: prompt embeddings encoded once
                variant_emb, variant_pooled = encode_text(comp, variants)  # (V, 77, D), SDXL: (V, P)
                class_emb, class_pooled = encode_text(comp, [class_prompt])  # (1, 77, D), SDXL: (1, P)
            first = 0
            if (ckpts[phase] / "state.json").exists():
                first, _ = checkpoints.load(
                    ckpts[phase], tr.named, optimizer, lr_scheduler, generator, accelerator.scaler, ema
                )
                log.info("resuming %s from the checkpoint after step %d in %s", phase, first, ckpts[phase])
            validation = sd_pipeline(comp, "ddim")  # shares the modules being trained
            for model in models:
                model.train()

            def save_checkpoint(step, phase=phase, tr=tr, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                accelerator=accelerator, ema=ema):  # fmt: skip
                training.on_main_process(accelerator, lambda: checkpoints.save(
                    ckpts[phase], step, tr.named, optimizer, lr_scheduler, generator, steplog.history,
                    steplog.images_dir, accelerator.scaler, ema,
                ))  # fmt: skip

            for step in tqdm(range(first, steps), desc=f"stage 1 {phase}", unit="step", initial=first, total=steps):
                totals = torch.zeros(3)
                for _micro in range(t.gradient_accumulation_steps):
                    with accelerator.accumulate(*models):
                        bucket = buckets.draw(photo_buckets, generator)  # the batch's size (one bucket: no draw)
                        idx = shard.indices(len(bucket), b, generator)  # into the bucket's photos
                        view = shard.indices(n_views, b, generator) if n_views > 1 else torch.zeros(b, dtype=torch.long)
                        posterior, loss_map = bucket.latents[idx, view], bucket.loss_maps[idx, view]  # (B, 4|1, h, w)
                        flip = torch.zeros(b, dtype=torch.bool)  # (B,) on the CPU, like the indices
                        if bucket.flipped is not None:
                            flip = shard.rand(b, generator) < t.flip_prob
                            # on the latents' device: only a 0-dim CPU tensor may mix with CUDA tensors in an op
                            flip_mask = flip.view(-1, 1, 1, 1).to(loss_map.device)
                            posterior = posterior.where(flip_mask, bucket.flipped[idx, view])
                            loss_map = torch.where(flip_mask, loss_map.flip(-1), loss_map)
                        latents = posterior.sample(generator, shard.rank_world)  # (B, 4, h, w)
                        chosen = shard.take(choose_variants(b * shard.world, len(templates), len(t.descriptive_words),
                                                            t.descriptive_prob, generator), b)  # fmt: skip
                        dropped = shard.take(caption_dropout(b * shard.world, t.caption_dropout, bool(captioned),
                                                             generator), b)  # fmt: skip
                        chosen = with_captions(
                            chosen, rows[bucket.index[idx]], dropped, len(templates), len(t.descriptive_words)
                        )
                        if with_prior:  # instance half first, then the class half: (2B, ...)
                            cidx = shard.indices(len(bucket.class_latents), b, generator)
                            latents = torch.cat(
                                [latents, bucket.class_latents[cidx].sample(generator, shard.rank_world)]
                            )
                            loss_map = torch.cat([loss_map, torch.ones_like(loss_map)])
                        if tr.text_encoder_trains:  # prompts through the text encoder(s) being trained
                            ids = [v[chosen] for v in variant_ids]
                            if with_prior:
                                ids = [torch.cat([i, k.expand(b, -1)]) for i, k in zip(ids, class_ids, strict=True)]
                            with accelerator.autocast():
                                encoder_hidden_states, pooled = encode_ids(comp, ids, models[1:])  # (B or 2B, 77, D)
                        else:
                            encoder_hidden_states = variant_emb[chosen]  # (B, 77, D)
                            pooled = variant_pooled[chosen] if xl else None
                            if with_prior:
                                encoder_hidden_states = torch.cat([encoder_hidden_states, class_emb.expand(b, -1, -1)])
                                pooled = torch.cat([pooled, class_pooled.expand(b, -1)]) if xl else None
                        ids_time = bucket.time_ids[idx, view, flip.long()] if xl else None  # (B, 6)
                        if xl and with_prior:
                            ids_time = torch.cat([ids_time, bucket.class_time_ids])
                        noisy_latents, noise, timesteps = add_noise(
                            scheduler, latents, generator, t.noise_offset, shard.rank_world
                        )
                        with accelerator.autocast():
                            model_pred = models[0](
                                noisy_latents, timesteps, encoder_hidden_states, **added_conditions(pooled, ids_time)
                            ).sample
                        step_losses, grad_norm = training.loss_and_step(
                            accelerator, scheduler, model_pred, latents, noise, timesteps, with_prior, t,
                            tr.params, optimizer, lr_scheduler, loss_map if use_loss_maps else None,
                        )  # fmt: skip
                        if accelerator.sync_gradients:
                            tr.after_step()  # textual inversion: every other embedding row back; the EMA's step
                        totals += step_losses
                totals = training.reduce_losses(accelerator, totals)  # the mean over processes
                if accelerator.is_main_process and t.validation_every and (done + step + 1) % t.validation_every == 0:
                    for model in models:
                        model.eval()
                    for i, prompt in enumerate(validation_prompts):
                        # under autocast: the prepared UNet returns fp32, which a half-precision VAE rejects
                        with accelerator.autocast():
                            (image,) = generate(validation, prompt, [c.seed], steps=t.validation_steps,
                                                guidance_scale=5.0, resolution=c.resolution)  # fmt: skip
                        steplog.image(f"validation_{i}", done + step + 1, image)
                    for model in models:
                        model.train()
                training.end_of_step(steplog, step, totals, grad_norm, lr_scheduler, t, save_checkpoint, steps)
            for model in models:
                model.eval()
            if ema is not None:  # what is saved (and what momentum_ti's next phase trains on) is the EMA
                ema.copy_to(tr.named.values())
            if phase != phases[-1]:  # a re-run after a stop in a later phase skips this one
                save_checkpoint(steps)
            done += steps
        # (the method is the param train.method, a `dvc exp show` column already: metrics hold numbers only)
        steplog.summary(steps=done, trainable_params=trainable_count, identifier_tokens=len(identifier["tokens"]),
                        face_boxes=sum(b is not None for b in faces) if t.face_loss_weight > 0 else 0)  # fmt: skip

        def write_outputs() -> None:
            with outputs.atomic_dir(args.out) as tmp:
                files = methods.save(t.method, comp, tmp, t, c.identifier)
                if t.export_kohya:  # exports/: what AUTOMATIC1111/Forge and ComfyUI load (posebooth/exports.py)
                    subject = exports.Subject.from_params(cfg.as_dict(), xl)
                    exports.write_stage1(tmp, tmp / "exports", subject, dict(comp.unet.config),
                                         exports.base_weights_of(comp))  # fmt: skip
                outputs.write_json(tmp / "provenance.json", provenance.provenance(
                    cfg.as_dict(), base_model=c.model, method=t.method, trigger=templates[0], identifier_check=identifier,
                    files=[f.name for f in files],
                ))  # fmt: skip
                (tmp / "README.md").write_text(
                    provenance.stage1_card(c.model, templates[0], t.method, xl, c.identifier, t.adapter)
                )
                drop_local_paths(tmp)
            steplog.close()
            checkpoints.remove(ckpt_root)

        training.on_main_process(accelerator, write_outputs)
    except BaseException:
        steplog.abort()
        raise
    log.info("trained %d steps (%s) in %.1f s; saved to %s", done, t.method, time.perf_counter() - start, args.out)


if __name__ == "__main__":
    outputs.run_stage(main)
