"""Prior-preservation batches: instance half first, class half second, each half with its own conditioning.

The loss on a hand-made batch (``training.loss_and_step``): λ (``prior_loss_weight``) scales the class term
only, and the loss map weights the half it belongs to. The batch assembly itself is written inline in the
training stages' loops, so the stages' ``main()`` runs in-process (one step, tiny models) with spies on what
it hands the UNet, the ControlNet and the loss; the VAE posteriors are replaced by labelled constants (std 0:
instance image i has latents ``i + 1``, class image k ``-(k + 1)``), so that every latent in the batch says
where it came from.
"""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from posebooth import augment, data, training
from posebooth.augment import box_mask
from posebooth.diffusion import prior_preservation_loss
from posebooth.models import Latents, encode_text, load_components
from posebooth.prompts import instance_prompts, prompt_variants
from tests.conftest import ROOT
from tests.profile import apply_profile

SIZE = 32
B = 2  # instance images per step, and as many class images
FACE = (0.0, 0.0, 16.0, 16.0)  # a face box in every photo: the top-left quarter (2 x 2 latent cells)
FACE_WEIGHT = 3.0
LAMBDA = 2.0


# --- the loss on a hand-made batch --------------------------------------------------------------------------------


def knobs(prior_loss_weight: float) -> SimpleNamespace:
    return SimpleNamespace(steps=1, lr=0.1, weight_decay=0.0, optimizer="adamw", lr_scheduler="constant",
                           lr_warmup_steps=0, gradient_accumulation_steps=1, gradient_checkpointing=False,
                           max_grad_norm=1e9, snr_gamma=0.0, prior_loss_weight=prior_loss_weight)  # fmt: skip


def step_losses(pred: torch.Tensor, target: torch.Tensor, loss_map: torch.Tensor, weight: float) -> torch.Tensor:
    """``(total, instance, prior)`` of one ``training.loss_and_step`` on ``pred`` (2B, 4, 4, 4), a stand-in
    for the UNet's prediction that depends on one trained parameter."""
    from diffusers import DDPMScheduler

    offset = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.offset = offset
    acc, _, opt, sched = training.prepare([model], [offset], knobs(weight), "cpu", "fp32")
    noise_scheduler = DDPMScheduler()  # epsilon prediction: the target is the noise
    timesteps = torch.zeros(len(pred), dtype=torch.long)
    losses, _ = training.loss_and_step(acc, noise_scheduler, pred + offset, torch.zeros_like(target), target,
                                       timesteps, True, knobs(weight), [offset], opt, sched, loss_map)  # fmt: skip
    return losses


def test_lambda_scales_the_prior_term_and_the_loss_map_weights_the_instance_half():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2 * B, 4, 4, 4, generator=g), torch.randn(2 * B, 4, 4, 4, generator=g)
    masks = torch.stack([box_mask(FACE, SIZE, 4)] * B)  # (B, 1, 4, 4)
    loss_map = torch.cat([1 + FACE_WEIGHT * masks, torch.ones_like(masks)])  # as the stage assembles it
    err = (pred - target) ** 2  # (2B, 4, 4, 4)
    instance = (err[:B] * loss_map[:B]).mean()  # every sample has the same number of elements
    prior = err[B:].mean()

    one = step_losses(pred, target, loss_map, 1.0)
    two = step_losses(pred, target, loss_map, LAMBDA)
    torch.testing.assert_close(one[1:], torch.stack([instance, prior]))
    torch.testing.assert_close(two[0] - one[0], (LAMBDA - 1) * prior)  # λ = 2 adds the prior term once more
    torch.testing.assert_close(two[0], instance + LAMBDA * prior)
    swapped = step_losses(torch.cat([pred[B:], pred[:B]]), torch.cat([target[B:], target[:B]]), loss_map, LAMBDA)
    assert abs(swapped[0] - two[0]) > 0.1  # a batch assembled class half first gives another loss
    _, unweighted_instance, _ = prior_preservation_loss(pred, target, LAMBDA, True)
    assert abs(unweighted_instance - instance) > 0.1  # and the face weights did reach the instance half


# --- the stages' assembly ------------------------------------------------------------------------------------------


def workspace(tmp_path, monkeypatch, model: str, train: dict) -> dict:
    """The current directory: params.yaml (test profile, one step of ``B`` + ``B``), data/prepared (the embedded
    subject's photos) and data/class_priors (three hand-made class images); returns the params."""
    shutil.copytree(ROOT / "data" / "subject", tmp_path / "data" / "subject")
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["common"]["model"] = model
    params["train"].update(steps=1, lr_warmup_steps=0, batch_size=B, prior_loss_weight=LAMBDA, flip_prob=0.0,
                           face_loss_weight=FACE_WEIGHT, validation_every=0, checkpoint_every=0, export_kohya=False,
                           **train)  # fmt: skip
    prepare_in(tmp_path, monkeypatch, params)
    priors = tmp_path / "data" / "class_priors"
    (priors / "images").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (SIZE, SIZE), (40 * k, 90, 200)).save(priors / "images" / f"class_{k:04d}.png")
    write_class_manifest(priors, 3)
    return params


def prepare_in(tmp_path, monkeypatch, params: dict) -> None:
    """``params`` written to tmp_path/params.yaml, tmp_path made the current directory, prepare_images run."""
    from stages import prepare_images

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prepare_images"])
    prepare_images.main()


def write_class_manifest(priors, n: int) -> None:
    """The manifest of ``n`` class images ``images/class_0000.png``... that a test drew into ``priors``."""
    records = [{"file": f"images/class_{k:04d}.png", "seed": k} for k in range(n)]
    (priors / "manifest.json").write_text(json.dumps({"images": records}))


class Spy:
    """What a stage hands its networks and its loss; its VAE posteriors replaced by labelled constants."""

    def __init__(self, monkeypatch, stage):
        self.calls: dict[str, list] = {"unet": [], "controlnet": [], "loss": []}
        self.class_pixels = None
        self.comp = None
        real_class_images, real_loss = data.class_images, training.loss_and_step
        real_encode, real_load = stage.encode_posterior, stage.load_components

        def class_images(*args, **kwargs):
            self.class_pixels = real_class_images(*args, **kwargs)
            return self.class_pixels

        def encode_posterior(vae, pixels, batch_size=8):
            shape = real_encode(vae, pixels[:1], batch_size).mean.shape[1:]
            sign = -1.0 if pixels is self.class_pixels else 1.0
            label = sign * (1 + torch.arange(len(pixels), dtype=torch.float32))  # (N,)
            mean = label.view(-1, 1, 1, 1).expand(len(pixels), *shape).clone()
            return Latents(mean, torch.zeros_like(mean))

        def load_components(*args, **kwargs):
            self.comp = real_load(*args, **kwargs)
            self.comp.unet.register_forward_pre_hook(self._record("unet"), with_kwargs=True)
            return self.comp

        def loss_and_step(*args, **kwargs):
            result = real_loss(*args, **kwargs)
            self.calls["loss"].append((args, kwargs, result[0]))
            return result

        monkeypatch.setattr(data, "class_images", class_images)
        monkeypatch.setattr(stage, "encode_posterior", encode_posterior)
        monkeypatch.setattr(stage, "load_components", load_components)
        monkeypatch.setattr(training, "loss_and_step", loss_and_step)
        if hasattr(stage, "load_controlnet"):
            real_controlnet = stage.load_controlnet

            def load_controlnet(*args, **kwargs):
                controlnet = real_controlnet(*args, **kwargs)
                controlnet.register_forward_pre_hook(self._record("controlnet"), with_kwargs=True)
                return controlnet

            monkeypatch.setattr(stage, "load_controlnet", load_controlnet)

    def _record(self, name):
        def hook(module, args, kwargs):
            self.calls[name].append((args, kwargs))

        return hook


def labels(latents: torch.Tensor) -> list[float]:
    """The label of each sample of a batch of labelled latents (each sample is one constant)."""
    flat = latents.flatten(1)
    assert torch.equal(flat, flat[:, :1].expand_as(flat)), "latents that are not one labelled posterior each"
    return flat[:, 0].tolist()


def assert_rows_in(rows: torch.Tensor, table: torch.Tensor) -> None:
    """Every row of ``rows`` (N, ...) is one of the rows of ``table`` (M, ...)."""
    for row in rows:
        assert any(torch.equal(row, candidate) for candidate in table), "a row that is none of the expected ones"


CASES = {
    "sd15": ("embedded:tiny-sd15", {}),
    "sd15_text_encoder": ("embedded:tiny-sd15", {"train_text_encoder": True}),
    "sdxl": ("embedded:tiny-sdxl", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_stage1_pairs_each_class_latent_with_the_class_prompt_and_its_own_weights(tiny_sd, tmp_path, monkeypatch,
                                                                                  case):  # fmt: skip
    """One step of train_stage1_appearance: the UNet's batch is B instance latents, then B class latents; the
    class half has the class prompt's embedding (SDXL: its pooled embedding and generated-image time ids), the
    instance half the training prompts' (SDXL: each photo's own time ids); the face-weighted loss map covers
    the instance half only; and the logged loss is instance + λ · prior."""
    from stages import train_stage1_appearance as stage

    model, train = CASES[case]
    params = workspace(tmp_path, monkeypatch, model, train)
    monkeypatch.setattr(augment, "face_boxes", lambda pixels: [FACE] * len(pixels))
    spy = Spy(monkeypatch, stage)
    monkeypatch.setattr(sys, "argv", ["train_stage1_appearance"])
    stage.main()

    (unet_args, unet_kwargs), (loss_args, _, losses) = spy.calls["unet"][0], spy.calls["loss"][0]
    latents = loss_args[3]  # the clean latents (2B, 4, h, w) the noise was added to
    instance, prior = labels(latents[:B]), labels(latents[B:])
    assert all(x > 0 for x in instance) and all(x < 0 for x in prior)
    assert loss_args[6] is True  # with_prior

    c, t = params["common"], params["train"]
    comp = load_components(model)  # the text encoders as they were at the step (a text-encoder LoRA starts at 0)
    class_prompt = c["class_prompt"].format(class_noun=c["class_noun"])
    variants = prompt_variants(instance_prompts(t["prompt_templates"], c["identifier"], c["class_noun"],
                                                t["class_word_in_prompt"]), t["descriptive_words"])  # fmt: skip
    class_emb, class_pooled = encode_text(comp, [class_prompt])
    variant_emb, variant_pooled = encode_text(comp, variants)
    encoder_hidden_states = unet_args[2]  # (2B, 77, D)
    torch.testing.assert_close(encoder_hidden_states[B:], class_emb.expand(B, -1, -1), rtol=0, atol=1e-6)
    assert_rows_in(encoder_hidden_states[:B].detach(), variant_emb)

    if comp.xl:
        added = unet_kwargs["added_cond_kwargs"]
        assert torch.equal(added["text_embeds"][B:], class_pooled.expand(B, -1))
        assert_rows_in(added["text_embeds"][:B].detach(), variant_pooled)
        names = [r["name"] for r in json.loads((tmp_path / "data/prepared/manifest.json").read_text())["images"]]
        photo_ids = data.time_ids("data/prepared", names, SIZE)  # (N, 6), each photo's recorded size and crop
        assert torch.equal(added["time_ids"][B:], data.generated_time_ids(B, SIZE))
        assert torch.equal(added["time_ids"][:B], photo_ids[[int(x) - 1 for x in instance]])
        assert not torch.equal(photo_ids[0], data.generated_time_ids(1, SIZE)[0])  # (so the halves can differ)
    else:
        assert "added_cond_kwargs" not in unet_kwargs

    loss_map = loss_args[11]  # (2B, 1, h, w)
    face = 1 + FACE_WEIGHT * box_mask(FACE, SIZE, latents.shape[-1])
    assert torch.equal(loss_map[:B], face.expand(B, -1, -1, -1))
    assert torch.equal(loss_map[B:], torch.ones_like(loss_map[B:]))
    total, instance_loss, prior_loss = losses.tolist()
    assert prior_loss > 0 and total == pytest.approx(instance_loss + LAMBDA * prior_loss, rel=1e-6)


def test_stage2_pairs_each_class_image_with_its_own_pose_and_the_class_prompt(tiny_sd, tmp_path, monkeypatch):
    """One step of train_stage2_pose with (class image, its pose) pairs: the ControlNet's batch is B instance
    latents with their own pose maps and the instance prompt, then B class latents with their own pose maps and
    the class prompt; the UNet gets the same latents and prompts; the logged loss is instance + λ · prior."""
    from stages import train_stage2_pose as stage
    from tests.test_lora import _random_lora

    params = workspace(tmp_path, monkeypatch, "embedded:tiny-sd15", {})
    # export off: the hand-made stage-1 folder has no provenance.json to name the exports after
    params["train_pose"].update(steps=1, batch_size=B, prior_loss_weight=LAMBDA, empty_prompt_prob=0.0,
                                checkpoint_every=0, export=False)  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _random_lora(tmp_path / "models" / "stage1", alpha=4.0, std=0.2, seed=1)
    # data/poses by hand: every image used, pose map i a flat grey that names its image
    names = [r["name"] for r in json.loads((tmp_path / "data/prepared/manifest.json").read_text())["images"]]
    pairs = [(n, "instance", 10 * (i + 1)) for i, n in enumerate(names)]
    pairs += [(f"class_{k:04d}", "class", 200 + 10 * k) for k in range(3)]
    (tmp_path / "data/poses/maps").mkdir(parents=True)
    for name, _, grey in pairs:
        Image.new("RGB", (SIZE, SIZE), (grey,) * 3).save(tmp_path / "data/poses/maps" / f"{name}.png")
    report = {"images": [{"name": n, "kind": kind, "used": True} for n, kind, _ in pairs]}
    (tmp_path / "data/poses/report.json").write_text(json.dumps(report))
    real_pose_pairs = data.pose_pairs

    def pose_pairs(poses, dirs, resolution, kind):  # the class images' pixels are what the spy labels
        found = real_pose_pairs(poses, dirs, resolution, kind)
        if kind == "class":
            spy.class_pixels = found[1]
        return found

    spy = Spy(monkeypatch, stage)
    monkeypatch.setattr(data, "pose_pairs", pose_pairs)
    monkeypatch.setattr(sys, "argv", ["train_stage2_pose"])
    stage.main()

    (_, cn_kwargs), (unet_args, _) = spy.calls["controlnet"][0], spy.calls["unet"][0]
    latents = spy.calls["loss"][0][0][3]  # loss_and_step's clean latents (2B, 4, h, w)
    instance, prior = labels(latents[:B]), labels(latents[B:])
    assert all(x > 0 for x in instance) and all(x < 0 for x in prior)
    greys = np.round(cn_kwargs["controlnet_cond"].flatten(1).mean(1).numpy() * 255).tolist()  # (2B,)
    assert greys[:B] == [10 * x for x in instance]  # instance image i with pose map i
    assert greys[B:] == [200 + 10 * (-x - 1) for x in prior]  # class image k with pose map k
    c = params["common"]
    prompts = [c["instance_prompt"], c["class_prompt"]]
    embeddings, _ = encode_text(spy.comp, [p.format(identifier=c["identifier"], class_noun=c["class_noun"])
                                           for p in prompts])  # fmt: skip
    for states in (cn_kwargs["encoder_hidden_states"], unet_args[2]):
        torch.testing.assert_close(states[:B], embeddings[:1].expand(B, -1, -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(states[B:], embeddings[1:].expand(B, -1, -1), rtol=0, atol=1e-6)
    total, instance_loss, prior_loss = spy.calls["loss"][0][2].tolist()
    assert prior_loss > 0 and total == pytest.approx(instance_loss + LAMBDA * prior_loss, rel=1e-6)
