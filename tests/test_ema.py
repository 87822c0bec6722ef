"""``ema_decay``: the saved weights are diffusers' EMA of the trained ones (its schedule, computed by hand here);
0 saves the raw weights; textual inversion's untouched rows stay exact; a checkpoint carries the EMA on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from posebooth import checkpoints, methods, training
from posebooth.diffusion import add_noise
from posebooth.models import load_components
from tests.test_methods import PROMPT, TOKEN_ROW, run_steps, subject_latents, train_cfg


def ema_decay_at(n: int, decay: float) -> float:
    """The decay diffusers' EMAModel (no warmup) uses at optimizer step ``n``: 0 first (a copy), then n / (n + 9),
    capped at ``decay``."""
    return 0.0 if n == 1 else min(decay, n / (n + 9))


def raw_steps(comp, tr, t, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` optimizer steps the way the stage takes them (``tr.after_step`` steps the EMA); the raw weights
    after each."""
    latents, raw = subject_latents(comp), []
    for k in range(steps):
        run_steps(comp, tr, t, latents, 1, seed=k)
        raw.append({n: p.detach().clone() for n, p in tr.named.items()})
    return raw


@pytest.mark.parametrize("decay", [0.0, 0.1, 0.9])  # 0.1: the cap decides at step 2; 0.9: the schedule (2/11)
def test_saved_lora_is_the_ema_of_the_raw_weights(tiny_sd, tmp_path, decay):
    t = train_cfg(method="lora", train_text_encoder=True, ema_decay=decay)
    comp = load_components("embedded:tiny-sd15")
    tr = methods.setup("lora", comp, t, "sks", "robot")
    tr.ema = training.make_ema(tr.named.values(), t.ema_decay)
    w1, w2 = raw_steps(comp, tr, t, 2)
    assert any(not torch.equal(w1[n], w2[n]) for n in w1)
    if tr.ema is not None:  # as the stage ends a phase
        tr.ema.copy_to(tr.named.values())
    ema_file = methods.save("lora", comp, tmp_path / "ema", t, "sks")[0]

    d2 = ema_decay_at(2, decay)
    reference = {n: d2 * w1[n] + (1 - d2) * w2[n] for n in w1} if decay else w2  # decay 0: the raw weights
    for n, p in tr.named.items():
        torch.testing.assert_close(p.detach(), reference[n], rtol=1e-6, atol=1e-8, msg=n)
    with torch.no_grad():  # the file the reference weights give is the file saved
        for n, p in tr.named.items():
            p.copy_(reference[n])
    ref_file = methods.save("lora", comp, tmp_path / "ref", t, "sks")[0]
    saved, expected = load_file(ema_file), load_file(ref_file)
    assert set(saved) == set(expected) and any(k.startswith("text_encoder.") for k in saved)
    for k in expected:
        torch.testing.assert_close(saved[k], expected[k], rtol=1e-6, atol=1e-8, msg=k)


def test_textual_inversion_ema_keeps_every_other_row_exact(tiny_sd, tmp_path):
    """The EMA steps after the row restore: rows other than the identifier's stay bit-identical (weight decay
    would otherwise shrink them into the average), the identifier's row is the EMA of its raw values."""
    t = train_cfg(method="textual_inversion", weight_decay=0.1, ema_decay=0.9)
    comp = load_components("embedded:tiny-sd15")
    original = comp.text_encoder.get_input_embeddings().weight.detach().clone()
    tr = methods.setup("textual_inversion", comp, t, "sks", "robot")
    tr.ema = training.make_ema(tr.named.values(), t.ema_decay)
    w1, w2 = raw_steps(comp, tr, t, 2)
    tr.ema.copy_to(tr.named.values())

    token = 48136  # "sks</w>"
    weight, d2 = tr.named[TOKEN_ROW].detach(), ema_decay_at(2, 0.9)
    others = torch.ones(len(weight), dtype=torch.bool)
    others[token] = False
    assert torch.equal(weight[others], original[others])
    row = d2 * w1[TOKEN_ROW][token] + (1 - d2) * w2[TOKEN_ROW][token]
    assert not torch.equal(w1[TOKEN_ROW][token], w2[TOKEN_ROW][token])
    torch.testing.assert_close(weight[token], row, rtol=1e-6, atol=1e-8)
    (path,) = methods.save("textual_inversion", comp, tmp_path, t, "sks")
    torch.testing.assert_close(load_file(path)["sks"][0], row, rtol=1e-6, atol=1e-8)


def train_with_checkpoint(t, folder, steps: int, save_after: int | None = None, resume: bool = False):
    """A LoRA run of ``steps`` optimizer steps with a continuous optimizer (as the stage's loop), checkpointed
    after step ``save_after`` into ``folder``, or resumed from it; returns (weights, EMA shadow weights)."""
    comp = load_components("embedded:tiny-sd15")
    latents = subject_latents(comp)
    tr = methods.setup("lora", comp, t, "sks", "robot")
    tr.ema = training.make_ema(tr.named.values(), t.ema_decay)
    g = torch.Generator().manual_seed(0)
    acc, (unet,), opt, sched = training.prepare([comp.unet], tr.groups, t, "cpu", "fp32", steps)
    ehs = comp.text_encoder(comp.tokenizer([PROMPT] * 2, padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids)[0].detach()  # fmt: skip
    first = checkpoints.load(folder, tr.named, opt, sched, g, ema=tr.ema)[0] if resume else 0
    unet.train()
    for step in range(first, steps):
        x = latents[torch.randint(0, len(latents), (2,), generator=g)]
        noisy, noise, ts = add_noise(comp.noise_scheduler, x, g)
        pred = unet(noisy, ts, ehs).sample
        training.loss_and_step(acc, comp.noise_scheduler, pred, x, noise, ts, False, t, tr.params, opt, sched)
        tr.after_step()
        if step + 1 == save_after:
            checkpoints.save(folder, step + 1, tr.named, opt, sched, g, [], ema=tr.ema)
    weights = {n: p.detach().clone() for n, p in tr.named.items()}
    return weights, [s.clone() for s in tr.ema.shadow_params]


def test_a_resumed_step_equals_an_uninterrupted_one_with_ema(tiny_sd, tmp_path):
    """Checkpoint after step 2 (the average no longer equals the weights), resume for step 3: the weights and
    the EMA equal those of the run that went on; the EMA's step count (its decay schedule) comes back too."""
    t = train_cfg(method="lora", ema_decay=0.9)
    folder = tmp_path / "ckpt"
    whole, whole_ema = train_with_checkpoint(t, folder, 3, save_after=2)
    resumed, resumed_ema = train_with_checkpoint(t, folder, 3, resume=True)
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    assert all(torch.equal(a, b) for a, b in zip(whole_ema, resumed_ema, strict=True))
    assert any(not torch.equal(a, whole[n]) for a, n in zip(whole_ema, whole, strict=True))  # the EMA is not a copy
