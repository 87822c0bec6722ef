"""``train.adapter``: DoRA, LoHa and LoKr (PEFT) next to LoRA, on the tiny models.

One real optimisation step per adapter; save → load through the code sampling runs (``subject.trained_pipelines``)
gives the in-memory model's outputs; DoRA through a stock diffusers ``load_lora_weights``; and the UI exports:
the weight each UI rebuilds from the exported keys, by the UI's own formula re-stated below from its source,
is the weight PEFT's forward computes, module by module, and every key maps to a module by the UIs' key rules
(``tests/test_exports.py``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from posebooth import exports, methods
from posebooth.lora import LORA_FILE, PEFT_DIR, adapter_parameters
from posebooth.models import encode_ids, load_components, tokenize
from tests.test_exports import _a1111_failed, _a1111_layer_names, _comfyui_key_map

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
KIND_KEYS = {  # a PEFT parameter name that only this adapter has
    "dora": "lora_magnitude_vector",
    "loha": "hada_w2_b",
    "lokr": "lokr_w1",
}


def _setup(ref: str, adapter: str, rank: int = 4, alpha: float = 2.0):
    """The tiny model with method lora's adapters (UNet and text encoders) as ``methods.setup`` adds them."""
    comp = load_components(ref)
    t = SimpleNamespace(rank=rank, alpha=alpha, target_modules=TARGETS, adapter=adapter, train_text_encoder=True,
                        lr=1e-2, text_encoder_lr=1e-2)  # fmt: skip
    return comp, t, methods.setup("lora", comp, t, "sks", "robot")


def _randomise(trainable, seed: int = 1) -> None:
    """Trained-looking adapter weights: every one moved off its initialisation (some start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable.params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _adapted(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _weight_delta(module) -> torch.Tensor:
    """(out, in): what the adapter adds to the module's weight, read off PEFT's own forward on the identity."""
    base = module.get_base_layer()
    eye = torch.eye(base.in_features)
    with torch.no_grad():
        return (module(eye) - base(eye)).T


def _ids(tokenizer, prompt="a photo of sks robot"):
    return tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_one_step_trains_the_adapter_and_nothing_else(adapter):
    comp, t, trainable = _setup("embedded:tiny-sd15", adapter)
    models = {"unet": comp.unet, "text_encoder": comp.text_encoder}
    for model in models.values():  # the adapter asked for, in every target module, in the UNet and the text encoder
        modules = _adapted(model).values()
        assert modules and all(any(KIND_KEYS[adapter] in n for n, _ in m.named_parameters()) for m in modules)
    assert {id(p) for p in trainable.params} == {
        id(p) for m in models.values() for p in adapter_parameters(m, "default")
    }
    frozen = {f"{k}.{n}": p.detach().clone() for k, m in models.items() for n, p in m.named_parameters()
              if not p.requires_grad}  # fmt: skip
    assert all(_weight_delta(m).abs().max() < 1e-6 for m in _adapted(comp.unet).values())  # each starts as ΔW = 0

    from posebooth.diffusion import add_noise, prior_preservation_loss
    from posebooth.training import make_optimizer

    opt = make_optimizer(trainable.params, 1e-2, 0.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    ehs, _ = encode_ids(comp, tokenize(comp, ["a photo of sks robot", "a photo of a robot"]))  # (with grad)
    noisy, noise, timesteps = add_noise(comp.noise_scheduler, latents, g)
    loss, _, _ = prior_preservation_loss(comp.unet(noisy, timesteps, ehs).sample, noise, 1.0, True)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for part, model in models.items():  # every adapted module learned something ...
        for name, module in _adapted(model).items():
            assert _weight_delta(module).abs().max() > 1e-5, f"{part}.{name}"
    after = {f"{k}.{n}": p for k, m in models.items() for n, p in m.named_parameters()}
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # ... and no frozen weight moved


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_saved_adapter_loads_back_through_the_sampling_path(adapter, tmp_path):
    """methods.save → subject.trained_pipelines (what sample and ``posebooth generate`` run): the same text
    embeddings and UNet outputs as the in-memory model; scale 0 is the base model; stage 2's continued UNet
    adapter (unet_lora/) replaces stage 1's."""
    from posebooth.lora import save_unet_lora
    from posebooth.subject import trained_pipelines

    comp, t, trainable = _setup("embedded:tiny-sd15", adapter)
    _randomise(trainable)
    files = methods.save("lora", comp, tmp_path / "stage1", t, "sks")
    assert [f.name for f in files] == [PEFT_DIR if adapter in ("loha", "lokr") else LORA_FILE]
    x, ts = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ids = _ids(comp.tokenizer)

    def outputs(text_encoder, unet):
        with torch.no_grad():
            ehs = text_encoder(ids)[0]
            return ehs, unet(x, ts, ehs).sample

    def loaded(scale=1.0, extras=()):
        _, free = trained_pipelines(load_components("embedded:tiny-sd15"), str(tmp_path / "stage1"),
                                    str(tmp_path / "stage2"), "ddim", "cpu", "fp32", False, scale, extras,
                                    with_controlnet=False)  # fmt: skip
        return outputs(free.text_encoder, free.unet)

    want, got = outputs(comp.text_encoder, comp.unet), loaded()
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    base = load_components("embedded:tiny-sd15")
    plain, off = outputs(base.text_encoder, base.unet), loaded(0.0)
    assert (plain[1] - want[1]).abs().max() > 1e-4  # the adapter does something ...
    if adapter == "dora":  # ... sample.subject_lora_scale scales its low-rank part (PEFT leaves the magnitudes)
        assert (off[1] - want[1]).abs().max() > 1e-4 and (off[1] - plain[1]).abs().max() > 1e-4
    else:  # ... and scales it, to nothing at 0; the same folder as a sample.extra_loras entry is the same adapter
        assert torch.allclose(off[1], plain[1], atol=1e-6)
        assert torch.allclose(loaded(0.0, [(str(tmp_path / "stage1"), 1.0)])[1], want[1], atol=1e-6)

    with torch.no_grad():  # stage 2 went on training the UNet adapter
        for p in adapter_parameters(comp.unet, "default"):
            p.mul_(1.5)
    save_unet_lora(comp.unet, tmp_path / "stage2" / "unet_lora")
    assert torch.equal(outputs(comp.text_encoder, comp.unet)[1], loaded()[1])


@pytest.mark.parametrize("ref", ["embedded:tiny-sd15", "embedded:tiny-sdxl"])
def test_dora_loads_in_a_stock_diffusers_pipeline(ref, tmp_path):
    """DoRA in diffusers' format: ``pipe.load_lora_weights`` reads every magnitude (UNet and text encoders)."""
    from diffusers import DiffusionPipeline

    from posebooth import embedded

    comp, t, trainable = _setup(ref, "dora")
    _randomise(trainable)
    methods.save("lora", comp, tmp_path, t, "sks")
    with safe_open(str(tmp_path / LORA_FILE), "pt") as f:
        keys = list(f.keys())
    parts = ["unet", "text_encoder"] + (["text_encoder_2"] if comp.xl else [])
    assert all(any(k.startswith(f"{p}.") and "lora_magnitude_vector" in k for k in keys) for p in parts)
    pipe = DiffusionPipeline.from_pretrained(embedded.resolve(ref), **({} if comp.xl else dict(safety_checker=None,
                                             requires_safety_checker=False)))  # fmt: skip
    pipe.load_lora_weights(str(tmp_path), adapter_name="subject")
    for part in parts:
        trained = {n.replace(".default", ""): p for n, p in getattr(comp, part).named_parameters() if ".default" in n}
        got = {n.replace(".subject", ""): p for n, p in getattr(pipe, part).named_parameters() if ".subject" in n}
        assert trained.keys() == got.keys() and all(torch.equal(trained[k], got[k]) for k in trained), part
    if not comp.xl:
        ids, x, ts = _ids(comp.tokenizer), torch.randn(1, 4, 4, 4), torch.tensor([500])
        with torch.no_grad():
            ehs = comp.text_encoder(ids)[0]
            assert torch.equal(ehs, pipe.text_encoder(ids)[0])
            assert torch.equal(comp.unet(x, ts, ehs).sample, pipe.unet(x, ts, ehs).sample)


def _comfyui_weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """``comfy/weight_adapter/base.py`` ``weight_decompose`` at strength 1 (Forge's ``backend/patcher/lora.py``
    is the same): a ``dora_scale`` along the output axis (shape[0] = out) divides by the row norms of the *base*
    weight, else by the column norms of the merged one; plus the weight dtype's eps."""
    if dora_scale.shape[0] == merged.shape[0]:
        norm = (
            weight.reshape(weight.shape[0], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        )
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def _a1111_weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """A1111's ``extensions-builtin/Lora/network.py`` ``apply_weight_decompose``: always the merged weight's
    column norms (the input axis), whatever the shape of ``dora_scale``."""
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    return merged * (dora_scale / norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))


def _ui_weight(lora: dict, name: str, weight: torch.Tensor, decompose=_comfyui_weight_decompose) -> torch.Tensor:
    """The weight a UI patches module ``name`` to, from the exported keys: ComfyUI's ``calculate_weight`` of
    ``comfy/weight_adapter/{lora,loha,lokr}.py`` (A1111's ``network_lora.py``, ``network_hada.py`` and
    ``network_lokr.py`` scale alike: alpha / dim when there is a dim, else 1), at strength 1; a ``dora_scale``
    through ``decompose``."""
    alpha = lora[f"{name}.alpha"].item()
    if f"{name}.hada_w1_a" in lora:  # loha.py: (w1a @ w1b) * (w2a @ w2b), alpha / w1b.shape[0]
        w1a, w1b, w2a, w2b = (lora[f"{name}.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b"))
        return weight + (w1a @ w1b) * (w2a @ w2b) * (alpha / w1b.shape[0])
    if any(f"{name}.lokr_{k}" in lora for k in ("w1", "w1_a", "w2", "w2_a")):  # lokr.py
        dim, w = None, {}
        for k in ("w1", "w2"):
            if f"{name}.lokr_{k}" in lora:
                w[k] = lora[f"{name}.lokr_{k}"]
            else:
                w[k], dim = lora[f"{name}.lokr_{k}_a"] @ lora[f"{name}.lokr_{k}_b"], lora[f"{name}.lokr_{k}_b"].shape[0]
        return weight + torch.kron(w["w1"], w["w2"]).reshape(weight.shape) * (alpha / dim if dim is not None else 1.0)
    up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
    # lora.py: mm(up.flatten(1), down.flatten(1)) in the weight's shape, alpha / down.shape[0]
    merged = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
    if f"{name}.dora_scale" in lora:  # lora.py hands a dora_scale to weight_decompose
        return decompose(lora[f"{name}.dora_scale"], weight, merged)
    return merged


VARIANTS = [("dora", 4), ("loha", 4), ("lokr", 4), ("lokr", 2)]  # lokr 4: both Kronecker factors full; 2: w2 = a·b


@pytest.mark.parametrize(
    "ref, adapter, rank",
    [("embedded:tiny-sd15", a, r) for a, r in VARIANTS]
    + [("embedded:tiny-sdxl", a, 4) for a in ("dora", "loha", "lokr")],
)
def test_ui_export_rebuilds_the_weight_peft_trained(ref, adapter, rank, tmp_path):
    comp, t, trainable = _setup(ref, adapter, rank=rank, alpha=3.0)
    _randomise(trainable)
    methods.save("lora", comp, tmp_path, t, "sks")
    subject = exports.Subject("sks", "robot", "lora", ref, comp.xl, 32)
    base_weights = exports.base_weights_of(comp)  # (a DoRA's dora_scale needs them)
    (out,) = exports.write_stage1(tmp_path, tmp_path / "exports", subject, dict(comp.unet.config), base_weights)
    lora = load_file(str(out))
    parts = {"unet": comp.unet, "text_encoder": comp.text_encoder} | ({"text_encoder_2": comp.text_encoder_2}
                                                                         if comp.xl else {})  # fmt: skip
    names = set()
    for part, model in parts.items():
        for module_name, module in _adapted(model).items():
            name = exports.kohya_module_name(part, module_name, dict(comp.unet.config), comp.xl)
            names.add(name)
            weight = module.get_base_layer().weight.detach()
            got = _ui_weight(lora, name, weight) - weight
            assert torch.allclose(got, _weight_delta(module), atol=1e-5, rtol=1e-4), name
    assert {k.split(".")[0] for k in lora} == names  # one exported module per adapted module, no other key

    # every key reaches a module by the UIs' own key rules (tests/test_exports.py), on an unadapted copy
    base = load_components(ref)
    plain = {p: getattr(base, p) for p in parts}
    key_map = _comfyui_key_map(plain, comp.xl)
    comfy = {"dora": (".lora_up.weight", ".lora_down.weight", ".dora_scale"),
             "loha": tuple(f".hada_{k}" for k in ("w1_a", "w1_b", "w2_a", "w2_b")),
             "lokr": tuple(f".lokr_{k}" for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"))}[adapter]  # fmt: skip
    loaded = {f"{x}{s}" for x in key_map for s in (*comfy, ".alpha") if f"{x}{s}" in lora}
    assert loaded == set(lora)  # ComfyUI load_lora leaves none "not loaded"
    if comp.xl:  # (the A1111 UNet rules of tests/test_exports.py are SD 1.5's three layers per block; SDXL's
        failed, matched = _a1111_failed(lora, _a1111_layer_names(plain, True))  # original names need none)
        assert failed == {} and matched == len(names)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {  # as sd-scripts records LyCORIS's --network_args
        "dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}, "loha": {"algo": "loha"},
        "lokr": {"algo": "lokr"}}[adapter]  # fmt: skip
    # the alpha the modules carry: the trained 3.0, or r where LoKr's full factors hold α / r in lokr_w2 (when
    # every module has full factors, the metadata says r too; mixed, it keeps the trained α)
    alphas = {lora[k].item() for k in lora if k.endswith(".alpha")}
    assert float(meta["ss_network_alpha"]) == (alphas.pop() if len(alphas) == 1 else 3.0)
    assert meta["ss_network_dim"] == str(rank) and meta["ss_network_alpha"] in ("3.0", f"{float(rank)}")


def test_adapter_is_checked_against_the_method(tmp_path):
    """An unknown adapter, or an adapter other than lora for a method without a LoRA, names the key."""
    import copy

    import yaml

    from posebooth import config
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["train"]["adapter"] == "lora"  # the default: the pipeline as before train.adapter

    def load(**train):
        data = copy.deepcopy(params)
        data["train"] |= train
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
        return config.load(["common", "train"], tmp_path / "params.yaml")

    assert load(adapter="lokr", method="momentum_ti", train_text_encoder=False).train.adapter == "lokr"
    with pytest.raises(config.ConfigError, match=r"train.adapter: 'boft' is not allowed; choose one of \['lora'"):
        load(adapter="boft")
    with pytest.raises(config.ConfigError, match=r"train.adapter: dora is for method lora or momentum_ti"):
        load(adapter="dora", method="full")


def test_dora_export_is_exact_in_comfyui_on_conv_layers_and_found_from_the_provenance(tmp_path, caplog):
    """A DoRA on attention and conv layers (magnitude (1, out, 1, 1)): the weight ComfyUI/Forge rebuild is the
    one PEFT merges; A1111's input-axis formula would not rebuild it (hence the warning); ``posebooth export``
    (no models at hand) loads the base named in provenance.json and writes the same file; without base weights
    the converter says what it needs."""
    import copy

    ref = "embedded:tiny-sd15"
    comp = load_components(ref)
    t = SimpleNamespace(rank=2, alpha=3.0, target_modules=[*TARGETS, "conv1", "conv2"], adapter="dora",
                        train_text_encoder=False, lr=1e-2, text_encoder_lr=1e-2)  # fmt: skip
    _randomise(methods.setup("lora", comp, t, "sks", "robot"))
    methods.save("lora", comp, tmp_path, t, "sks")
    subject = exports.Subject("sks", "robot", "lora", ref, False, 32)
    with caplog.at_level("WARNING"):
        (out,) = exports.write_stage1(tmp_path, tmp_path / "exports", subject, dict(comp.unet.config),
                                      exports.base_weights_of(comp))  # fmt: skip
    assert "is a DoRA for ComfyUI and Forge" in caplog.text and "AUTOMATIC1111" in caplog.text
    lora = load_file(str(out))
    convs, a1111_off = 0, []
    for module_name, module in _adapted(comp.unet).items():
        name = exports.kohya_module_name("unet", module_name, dict(comp.unet.config), False)
        weight = module.get_base_layer().weight.detach()
        merged = copy.deepcopy(module)
        merged.merge()  # PEFT's own merged DoRA weight: m · M / ‖M‖ per output row
        want = merged.get_base_layer().weight.detach()
        assert lora[f"{name}.dora_scale"].shape == (weight.shape[0], *[1] * (weight.dim() - 1)), name
        assert torch.allclose(_ui_weight(lora, name, weight), want, atol=1e-5, rtol=1e-4), name
        a1111_off.append((_ui_weight(lora, name, weight, _a1111_weight_decompose) - want).abs().max().item())
        convs += weight.dim() == 4
    assert convs >= 4 and min(a1111_off) > 1e-3  # A1111 would load every module with other weights

    common = {"identifier": "sks", "class_noun": "robot", "model": ref, "resolution": 32}
    (tmp_path / "provenance.json").write_text(json.dumps({"params": {"common": common, "train": {"method": "lora"}}}))
    (again,) = exports.write_stage1(tmp_path, tmp_path / "again", subject, dict(comp.unet.config))
    assert again.read_bytes() == out.read_bytes()
    # `posebooth export --full-diff`: W' − W per module (fp16), which A1111 (network_full.py) and ComfyUI add as is
    from posebooth import cli

    cli.main(["export", "--stage1", str(tmp_path), "--stage2", str(tmp_path / "none"), "--out", str(tmp_path / "diff"),
              "--full-diff"])  # fmt: skip
    diffs = load_file(str(tmp_path / "diff" / f"{out.stem}_diff.safetensors"))
    assert set(diffs) == {k.replace(".dora_scale", ".diff") for k in scales_of(lora)}
    for module_name, module in _adapted(comp.unet).items():
        name = exports.kohya_module_name("unet", module_name, dict(comp.unet.config), False)
        merged = copy.deepcopy(module)
        merged.merge()
        weight, want = module.get_base_layer().weight.detach(), merged.get_base_layer().weight.detach()
        assert diffs[name + ".diff"].dtype == torch.float16
        assert torch.allclose(weight + diffs[name + ".diff"].float(), want, atol=2e-3), name
    with safe_open(str(tmp_path / "diff" / f"{out.stem}_diff.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"algo": "full"}

    # stage 2's continued UNet DoRA (here unchanged): the same dora_scale in the _pose file
    from diffusers import ControlNetModel

    from posebooth.lora import save_unet_lora

    save_unet_lora(comp.unet, tmp_path / "stage2" / "unet_lora")
    controlnet = ControlNetModel.from_unet(load_components(ref).unet)
    *_, pose = exports.write_stage2(tmp_path / "stage2", tmp_path, tmp_path / "pose", subject, dict(comp.unet.config),
                                    controlnet=controlnet)  # fmt: skip
    pose_lora = load_file(str(pose))
    scales = scales_of(lora)
    assert pose.name.endswith("_pose.safetensors") and all(torch.equal(pose_lora[k], lora[k]) for k in scales)
    state, config = exports.read_adapter(tmp_path)
    with pytest.raises(ValueError, match="dora: the UI export's dora_scale depends on the base model's weights"):
        exports.kohya_lora(state, config, dict(comp.unet.config), False)


def scales_of(lora: dict) -> list[str]:
    return [k for k in lora if k.endswith(".dora_scale")]


def test_stage1_writes_the_dora_export_from_its_loaded_base(tmp_path, monkeypatch):
    """One step of train_stage1_appearance with ``train.adapter: dora``: its exports/ file carries a
    ``dora_scale`` per module, from the base weights the stage has loaded (provenance.json is written after
    the exports), the bytes ``posebooth export`` writes again from the provenance."""
    import sys

    from posebooth import augment
    from stages import train_stage1_appearance as stage
    from tests.test_prior_batch import workspace

    workspace(tmp_path, monkeypatch, "embedded:tiny-sd15", {"adapter": "dora"})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"]["export_kohya"] = True  # (the workspace turns the exports off)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(augment, "face_boxes", lambda pixels: [None] * len(pixels))
    monkeypatch.setattr(sys, "argv", ["train_stage1_appearance"])
    stage.main()
    (out,) = (tmp_path / "models/stage1/exports").glob("*.safetensors")
    lora = load_file(str(out))
    downs = [k for k in lora if k.endswith(".lora_down.weight")]
    assert downs and all(k.replace(".lora_down.weight", ".dora_scale") in lora for k in downs)
    (again,) = exports.write_all(tmp_path / "models/stage1", None, tmp_path / "again")
    assert again.read_bytes() == out.read_bytes()


def test_a_loras_full_diff_needs_no_base_model(tmp_path, monkeypatch):
    """`posebooth export --full-diff` of a LoRA: W + diff is PEFT's merged weight, and the base model is never
    loaded for it (its diff is its own (α/r)·up·down; an SDXL base would take 14 GB of memory to read)."""
    import copy

    from posebooth import models

    ref = "embedded:tiny-sd15"
    comp, t, trainable = _setup(ref, "lora", alpha=3.0)
    _randomise(trainable)
    methods.save("lora", comp, tmp_path, t, "sks")
    common = {"identifier": "sks", "class_noun": "robot", "model": ref, "resolution": 32}
    (tmp_path / "provenance.json").write_text(json.dumps({"params": {"common": common, "train": {"method": "lora"}}}))
    monkeypatch.setattr(models, "load_components", lambda *a, **k: pytest.fail("loaded the base model"))
    written = exports.write_all(tmp_path, None, tmp_path / "out", full_diff=True)
    assert [p.name for p in written] == ["sks_robot_lora.safetensors", "sks_robot_lora_diff.safetensors"]
    diffs = load_file(str(written[1]))
    parts = {"unet": comp.unet, "text_encoder": comp.text_encoder}
    names = set()
    for part, model in parts.items():
        for module_name, module in _adapted(model).items():
            name = exports.kohya_module_name(part, module_name, dict(comp.unet.config), False)
            merged = copy.deepcopy(module)
            merged.merge()
            want = merged.get_base_layer().weight.detach()
            assert torch.allclose(module.get_base_layer().weight + diffs[f"{name}.diff"].float(), want, atol=2e-3)
            names.add(f"{name}.diff")
    assert set(diffs) == names
