"""Stage 2's ControlNet LoRA: trains only its LoRA, saves what stock diffusers loads, and the sampler finds
the ControlNet in every layout stage 2 writes."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel

from posebooth import embedded, outputs, training
from posebooth.lora import CONTROLNET_TARGETS, add_controlnet_lora, save_controlnet_lora
from posebooth.models import load_controlnet
from posebooth.subject import load_stage2_controlnet
from tests.test_training import knobs


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g),
            torch.rand(2, 3, 32, 32, generator=g))  # fmt: skip


def _out(cn):
    x, t, e, c = _inputs()
    with torch.no_grad():
        down, mid = cn(x, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
    return torch.cat([d.flatten() for d in down] + [mid.flatten()])


def test_controlnet_lora_trains_only_its_lora_and_loads_the_stock_way(tiny_sd, tmp_path):
    cn = load_controlnet("embedded:tiny-sd15-openpose")
    base_out = _out(cn)
    before = {k: v.clone() for k, v in cn.state_dict().items()}
    params = add_controlnet_lora(cn, 4, 4.0)
    assert params and all(p.dtype == torch.float32 for p in params)
    acc, (cn,), opt, sched = training.prepare([cn], params, knobs(lr=1e-2, steps=3), "cpu", "fp32")
    for _ in range(3):
        x, t, e, c = _inputs()
        down, mid = cn(x, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
        # Towards residuals of 1: from zero convolutions (all zeros) only a loss with a non-zero gradient
        # at zero output moves anything, as the diffusion loss does.
        loss = sum((d - 1).pow(2).mean() for d in down) + (mid - 1).pow(2).mean()
        training.backward_and_step(acc, loss, params, opt, sched, 1e9)
    after = cn.state_dict()
    for key, value in before.items():  # every base weight bit-identical (PEFT renames wrapped ones)
        k = key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[k], value), key
    zero_conv_lora = [k for k in after if "controlnet_down_blocks.0.lora_B" in k]
    assert zero_conv_lora and after[zero_conv_lora[0]].abs().sum() > 0  # the zero convolutions learn
    trained_out = _out(cn)
    assert not torch.allclose(trained_out, base_out)

    save_controlnet_lora(cn, tmp_path / "controlnet_lora")
    stock = ControlNetModel.from_pretrained(embedded.resolve("embedded:tiny-sd15-openpose"))
    stock.load_lora_adapter(str(tmp_path / "controlnet_lora"), prefix=None, use_safetensors=True)
    assert torch.allclose(_out(stock), trained_out, atol=1e-5)
    assert CONTROLNET_TARGETS.endswith("$")


def test_the_sampler_finds_every_stage2_layout(tiny_sd, tmp_path):
    cn = load_controlnet("embedded:tiny-sd15-openpose")
    full = tmp_path / "full"
    cn.save_pretrained(full / "controlnet", safe_serialization=True)
    assert torch.allclose(_out(load_stage2_controlnet(full, "cpu", "fp32")), _out(cn))

    add_controlnet_lora(cn, 4, 4.0)
    for n, p in cn.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    named = tmp_path / "named"
    save_controlnet_lora(cn, named / "controlnet_lora")
    outputs.write_json(named / "controlnet_base.json", {"controlnet": "embedded:tiny-sd15-openpose"})
    assert torch.allclose(_out(load_stage2_controlnet(named, "cpu", "fp32")), _out(cn), atol=1e-5)

    saved = tmp_path / "saved"
    save_controlnet_lora(cn, saved / "controlnet_lora")
    load_controlnet("embedded:tiny-sd15-openpose").save_pretrained(saved / "controlnet_base", safe_serialization=True)
    assert torch.allclose(_out(load_stage2_controlnet(saved, "cpu", "fp32")), _out(cn), atol=1e-5)
