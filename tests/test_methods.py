"""Every stage-1 method: one step trains exactly its weights; a short run lowers the loss; what it saves
loads in a stock diffusers pipeline, changes its images, and gives the images the trained model gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from posebooth import config, methods, subject, training
from posebooth.diffusion import add_noise, diffusion_target
from posebooth.images import to_tensor
from posebooth.models import encode_images, encode_prompts, load_components, sd_pipeline
from tests.conftest import ROOT
from tests.profile import TEST_PROFILE

PROMPT = "a photo of sks robot"
SIZE = 32


def train_cfg(**change) -> config.Train:
    """The project's train section with the test profile and ``change`` applied, validated."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["train"] | TEST_PROFILE["train"]
    raw |= dict(lr_scheduler="constant", lr_warmup_steps=0) | change  # the first step has a learning rate
    return config.build_section("train", raw)


def subject_latents(comp) -> torch.Tensor:
    """The embedded subject's photos, centre-cropped to 32 px, as latents (6, 4, 4, 4)."""
    pixels = []
    for path in sorted((ROOT / "data" / "subject").glob("robot_0*.*")):
        if path.suffix == ".json":
            continue
        with Image.open(path) as im:
            side = min(im.size)
            box = ((im.width - side) // 2, (im.height - side) // 2)
            image = im.convert("RGB").crop((*box, box[0] + side, box[1] + side)).resize((SIZE, SIZE))
        pixels.append(to_tensor(image))
    return encode_images(comp.vae, torch.stack(pixels))


def snapshot(comp) -> dict[str, torch.Tensor]:
    """Every weight of the UNet, text encoder and VAE under a name that survives adapters and wrappers."""
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        for key, value in getattr(comp, part).state_dict().items():
            key = key.replace(".base_layer", "").replace("token_embedding.base.", "token_embedding.")
            out[f"{part}.{key}"] = value.detach().clone().float()
    return out


def run_steps(comp, tr: methods.Trainable, t: config.Train, latents, steps: int, seed: int = 0, fixed=None) -> None:
    """``steps`` optimisation steps the way the stage takes them (prompt through the text encoder when it
    trains, otherwise encoded once; textual inversion's row restore after each step). ``fixed``: a
    generator seed that makes every step see the same (images, noise, timesteps), to overfit them."""
    g = torch.Generator().manual_seed(seed)
    models = [comp.unet, comp.text_encoder] if tr.text_encoder_trains else [comp.unet]
    acc, models, opt, sched = training.prepare(models, tr.groups, t, "cpu", "fp32", steps)
    ids = comp.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for m in models:
        m.train()
    for _ in range(steps):
        if fixed is not None:
            g = torch.Generator().manual_seed(fixed)
        idx = torch.randint(0, len(latents), (2,), generator=g)
        x = latents[idx]
        noisy, noise, ts = add_noise(comp.noise_scheduler, x, g)
        if tr.text_encoder_trains:
            ehs = models[1](ids.expand(2, -1))[0]
        else:
            ehs = encode_prompts(comp.tokenizer, comp.text_encoder, [PROMPT] * 2)
        pred = models[0](noisy, ts, ehs).sample
        training.loss_and_step(acc, comp.noise_scheduler, pred, x, noise, ts, False, t, tr.params, opt, sched)
        tr.after_step()
    for m in models:
        m.eval()


@torch.no_grad()
def eval_loss(comp, latents, seed: int = 123) -> float:
    """The denoising loss on the (images, noise, timesteps) that ``run_steps(fixed=seed)`` trains on."""
    g = torch.Generator().manual_seed(seed)
    x = latents[torch.randint(0, len(latents), (2,), generator=g)]
    noisy, noise, ts = add_noise(comp.noise_scheduler, x, g)
    ehs = encode_prompts(comp.tokenizer, comp.text_encoder, [PROMPT] * len(x))
    pred = comp.unet(noisy, ts, ehs).sample
    return torch.nn.functional.mse_loss(pred, diffusion_target(comp.noise_scheduler, x, noise, ts)).item()


def setup_method(comp, method: str, t) -> methods.Trainable:
    """Set up the method's last phase; for momentum_ti the DreamBooth phase is trained first (a few steps)."""
    tr = None
    for phase in methods.phases(method):
        if tr is not None:
            run_steps(comp, tr, t, subject_latents(comp), 3)
        tr = methods.setup(phase, comp, t, "sks", "robot")
    return tr


CASES = {
    "lora": dict(method="lora"),
    "lora_te": dict(method="lora", train_text_encoder=True),
    "full": dict(method="full"),
    "full_te": dict(method="full", train_text_encoder=True),
    "custom_diffusion": dict(method="custom_diffusion"),
    "custom_diffusion_token": dict(method="custom_diffusion", train_token_embedding=True),
    "textual_inversion": dict(method="textual_inversion"),
    "textual_inversion_new_token": dict(method="textual_inversion", new_token=True),
    "momentum_ti": dict(method="momentum_ti"),
}
TOKEN_ROW = "text_encoder.embeddings.token_embedding.weight"  # noqa: S105 - transformers 5 (4 had text_model. in between)


@pytest.mark.parametrize("case", CASES)
def test_one_step_changes_exactly_what_the_method_trains(tiny_sd, case):
    t = train_cfg(lr=1e-3, weight_decay=0.1, **CASES[case])  # weight decay: untouched rows must not shrink
    comp = load_components("embedded:tiny-sd15")
    latents = subject_latents(comp)
    tr = setup_method(comp, t.method, t)
    before = snapshot(comp)
    trained_before = {n: p.detach().clone() for n, p in tr.named.items()}
    run_steps(comp, tr, t, latents, 1)
    after = snapshot(comp)

    changed = {
        k for k in before if k in after and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])
    }
    trained = {n for n, p in tr.named.items() if not torch.equal(p.detach(), trained_before[n])}
    assert trained, "no trainable weight moved"
    assert changed - set(tr.named) == set(), sorted(changed - set(tr.named))[:5]  # the rest bit-identical
    if t.method == "full":
        assert any(k.startswith("unet.") for k in changed)
        assert any(k.startswith("text_encoder.") for k in changed) == t.train_text_encoder
    if t.method == "textual_inversion" or t.train_token_embedding:  # of the embedding table, one row moved
        tok = comp.tokenizer.convert_tokens_to_ids("sks") if t.new_token else 48136  # "sks</w>"
        rows = (before[TOKEN_ROW] != after[TOKEN_ROW]).any(dim=1)
        assert rows.nonzero().flatten().tolist() == [tok]
    kinds = {"lora": "lora_", "custom_diffusion": "custom_diffusion", "momentum_ti": "theta"}
    if t.method in kinds:  # and what moved is the method's own kind of weight
        assert all(kinds[t.method] in n or n == TOKEN_ROW for n in trained), trained
    if case == "lora_te":
        assert any(n.startswith("text_encoder.") for n in trained)
    if t.method == "momentum_ti":  # the identifier's embedding moves γ times as far as θ
        emb = comp.text_encoder.get_input_embeddings()
        assert torch.allclose(emb.row() - emb.e0, t.momentum_gamma * (emb.theta - emb.e0))
        assert torch.equal(emb.e0, before["text_encoder.embeddings.token_embedding.e0"])


def _fixed_batch(comp, latents, seed: int):
    """The (noisy latents, noise, timesteps) that ``run_steps(fixed=seed)`` trains on at every step."""
    g = torch.Generator().manual_seed(seed)
    x = latents[torch.randint(0, len(latents), (2,), generator=g)]
    return add_noise(comp.noise_scheduler, x, g)


def _hand_adamw(theta, grad_of, lr: float, weight_decay: float, steps: int) -> torch.Tensor:
    """``steps`` of AdamW (Loshchilov & Hutter; torch's defaults β = (0.9, 0.999), ε = 1e-8) on ``theta``,
    written out in float64: decoupled decay, then the bias-corrected moment step."""
    theta = theta.double()
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for k in range(1, steps + 1):
        g = grad_of(theta.float()).double()
        theta = theta * (1 - lr * weight_decay)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        theta = theta - lr * (m / (1 - 0.9**k)) / ((v / (1 - 0.999**k)).sqrt() + 1e-8)
    return theta


@pytest.mark.parametrize("method", ["textual_inversion", "momentum_ti"])
def test_the_identifier_row_moves_as_adamw_lr_and_gamma_imply(tiny_sd, method):
    """The learned row after 3 steps on one fixed batch equals a hand-written AdamW on that row alone
    (with the gradient clipping the stage applies): a wrong learning rate (lr vs ti_lr) or γ misses it."""
    import copy

    steps, gamma = 3, 0.25  # γ not the default 0.1; lr and ti_lr apart, so that each method must use its own
    t = train_cfg(method=method, lr=1e-2, ti_lr=4e-2, momentum_gamma=gamma, weight_decay=0.1)
    comp = load_components("embedded:tiny-sd15")
    latents = subject_latents(comp)
    tr = setup_method(comp, method, t)
    token = comp.tokenizer.convert_tokens_to_ids("sks</w>")
    emb = comp.text_encoder.get_input_embeddings()
    # The reference: a copy of the text encoder with its plain embedding table, the row set by hand.
    ref_te = copy.deepcopy(comp.text_encoder)
    if method == "momentum_ti":
        ref_te.set_input_embeddings(ref_te.get_input_embeddings().base)
        e0, start = emb.e0.clone(), emb.theta.detach().clone()
    else:
        start = emb.weight[token].detach().clone()
    table = ref_te.get_input_embeddings().weight
    table.requires_grad_(True)
    noisy, noise, ts = _fixed_batch(comp, latents, 123)
    ids = comp.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids

    def grad_of(theta: torch.Tensor) -> torch.Tensor:
        row = e0 + gamma * (theta - e0) if method == "momentum_ti" else theta
        with torch.no_grad():
            table[token] = row
        table.grad = None
        pred = comp.unet(noisy, ts, ref_te(ids)[0]).sample
        torch.nn.functional.mse_loss(pred, noise).backward()  # ε-prediction: the target is the noise
        # The stage clips the trained tensors' gradient norm to max_grad_norm (torch's clip_grad_norm_):
        # θ's for momentum TI (d row / d θ = γ), the whole table's for textual inversion.
        g = gamma * table.grad[token] if method == "momentum_ti" else table.grad[token]
        norm = g.norm() if method == "momentum_ti" else table.grad.norm()
        return g * min(1.0, t.max_grad_norm / (norm.item() + 1e-6))

    lr = t.ti_lr if method == "momentum_ti" else t.lr
    expected = _hand_adamw(start, grad_of, lr, t.weight_decay, steps)
    if method == "momentum_ti":
        expected = e0 + gamma * (expected - e0)
    before = methods.identifier_embedding(comp, "sks")[0].clone()  # (a view of the live table)
    run_steps(comp, tr, t, latents, steps, fixed=123)
    after = methods.identifier_embedding(comp, "sks")[0]
    moved = (expected - before.double()).abs()
    assert moved.mean() > 0.5 * steps * lr * (gamma if method == "momentum_ti" else 1)  # Adam: ~lr per step
    torch.testing.assert_close(after.double(), expected, atol=1e-5, rtol=0)


def _image(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # fmt: skip


def _stock(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as the trained side samples
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Learning rate, and the loss ratio (after / before) a 30-step overfit must beat: one embedding row moves
# the loss of the tiny model far less than a LoRA (and momentum TI moves it only γ = 0.1 as far); every
# computation is deterministic, so even a small ratio below 1 is the row's doing.
# For those two the bar only says the loss went down: the size of their step (lr, γ) is checked exactly
# by test_the_identifier_row_moves_as_adamw_lr_and_gamma_imply.
OVERFIT = {"lora": (1e-2, 0.6), "full": (1e-3, 0.5), "custom_diffusion": (1e-2, 0.8),
           "textual_inversion": (3e-2, 0.99), "momentum_ti": (0.3, 0.995)}  # fmt: skip


@pytest.mark.parametrize("method", config.METHODS)
def test_short_run_lowers_the_loss_and_the_output_loads_in_a_stock_pipeline(tiny_sd, tmp_path, method):
    change = dict(train_token_embedding=True) if method == "custom_diffusion" else {}
    lr, ratio = OVERFIT[method]
    t = train_cfg(method=method, lr=lr, ti_lr=lr, weight_decay=0.0, **change)
    comp = load_components("embedded:tiny-sd15")
    latents = subject_latents(comp)
    tr = setup_method(comp, method, t)
    start = eval_loss(comp, latents)
    run_steps(comp, tr, t, latents, 30, fixed=123)
    end = eval_loss(comp, latents)
    assert end < ratio * start, (start, end)

    files = methods.save(method, comp, tmp_path, t, "sks")
    assert files and all(f.exists() for f in files)
    trained_image = _image(sd_pipeline(comp, "ddim"))

    base = _stock(tiny_sd)
    base_image = _image(base)
    if method == "full":
        pipe = _stock(tmp_path)  # the folder is a whole pipeline
    else:
        pipe = base
        if method in ("lora", "momentum_ti"):
            pipe.load_lora_weights(str(tmp_path))
        if method == "custom_diffusion":
            subject.load_custom_diffusion(pipe, tmp_path / methods.CD_FILE)
        if method in ("textual_inversion", "momentum_ti", "custom_diffusion"):
            pipe.load_textual_inversion(str(tmp_path), weight_name=methods.TI_FILE)
    loaded_image = _image(pipe)
    assert np.abs(loaded_image - base_image).max() > 1e-2  # the subject changes the images
    np.testing.assert_allclose(loaded_image, trained_image, atol=2e-3)  # and they are the trained model's


def test_textual_inversion_keeps_other_rows_over_many_steps_with_weight_decay(tiny_sd):
    t = train_cfg(method="textual_inversion", lr=1e-2, weight_decay=0.5)
    comp = load_components("embedded:tiny-sd15")
    table = comp.text_encoder.get_input_embeddings().weight.detach().clone()
    tr = methods.setup("textual_inversion", comp, t, "sks", "robot")
    run_steps(comp, tr, t, subject_latents(comp), 5)
    now = comp.text_encoder.get_input_embeddings().weight.detach()
    moved = (now != table).any(dim=1).nonzero().flatten().tolist()
    assert moved == [48136]
    assert tr.learned_values == table.shape[1]  # one row is what learns


def test_new_token_starts_as_the_class_word(tiny_sd):
    comp = load_components("embedded:tiny-sd15")
    word = methods.class_word_embedding(comp.tokenizer, comp.text_encoder, "teddy bear")
    token = methods.add_token(comp.tokenizer, comp.text_encoder, "zqv", "teddy bear")
    assert token == 49408 and comp.tokenizer("a zqv toy", add_special_tokens=False).input_ids[1] == token
    assert torch.equal(comp.text_encoder.get_input_embeddings().weight[token], word)
    with pytest.raises(ValueError, match="already a token"):
        methods.add_token(comp.tokenizer, comp.text_encoder, "zqv", "teddy bear")


def test_a_split_identifier_is_refused_where_one_row_is_learned(tiny_sd):
    comp = load_components("embedded:tiny-sd15")
    with pytest.raises(ValueError, match="new_token"):
        methods.setup("textual_inversion", comp, train_cfg(method="textual_inversion"), "pkblz", "robot")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(method="textual_inversion", train_text_encoder=True), "train_text_encoder"),
        (dict(method="lora", train_token_embedding=True), "train_token_embedding"),
        (dict(method="lora", new_token=True), "new_token"),
        (dict(method="custom_diffusion", new_token=True), "new_token"),
        (dict(method="dreambooth"), "train.method"),
        (dict(momentum_gamma=0.0), "momentum_gamma"),
    ],
)
def test_options_for_other_methods_are_refused(change, match):
    with pytest.raises(config.ConfigError, match=match):
        config._check_method(train_cfg(**change))


def test_bf16_keeps_every_trained_weight_fp32(tiny_sd):
    for case in ("lora_te", "full_te", "custom_diffusion_token", "momentum_ti"):
        comp = load_components("embedded:tiny-sd15", precision="bf16")
        t = train_cfg(**CASES[case])
        tr = (
            setup_method(comp, t.method, t)
            if case != "momentum_ti"
            else methods.setup("momentum", comp, t, "sks", "robot")
        )
        assert all(p.dtype == torch.float32 for p in tr.params), case
