"""Base models from one checkpoint file (posebooth/single_file.py): the embedded models written out in the original
(A1111) layout load back through ``load_components`` into the same weights and the same images; the shipped
configs are SD 1.5's and SDXL's; pickles that would run code are refused; what a file is, from its keys alone."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from posebooth import config, exports, provenance, single_file
from posebooth.generation import generate
from posebooth.models import (
    Components,
    is_xl,
    load_components,
    load_controlnet,
    load_unet,
    sd_pipeline,
    unet_config,
    weights_fingerprint,
)
from tests import test_class_priors
from tests.test_class_priors import first_lookup

ROOT = single_file.CONFIGS.parents[1]
PARTS = ("unet", "vae", "text_encoder")
workdir = test_class_priors.workdir  # the fixture: a folder with the test profile's params.yaml, as cwd


def _text_model(state: dict) -> dict:
    """A CLIP text encoder's state dict with the ``text_model.`` prefix the original layout keeps (transformers 5
    saves ``CLIPTextModel`` without it)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def _openclip(state: dict) -> dict:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout (SDXL's ``conditioner.embedders.1.model.``):
    the inverse of diffusers' ``convert_open_clip_checkpoint``, q/k/v fused into ``in_proj``."""
    out, layers = {}, {}
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    for k, v in state.items():
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith("text_model.encoder.layers."):
            i, rest = k.removeprefix("text_model.encoder.layers.").split(".", 1)
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):  # fmt: skip
                rest = rest.replace(a, b)
            if rest.startswith("self_attn."):  # q_proj.weight → in_proj_weight, rows q, k, v
                proj, kind = rest.removeprefix("self_attn.").split(".")
                layers.setdefault((i, kind), {})[proj] = v
            else:
                out[f"transformer.resblocks.{i}.{rest}"] = v
    for (i, kind), p in layers.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([p["q_proj"], p["k_proj"], p["v_proj"]])
    return out


def write_checkpoint(comp, path, dtype=torch.float32):
    """Loaded components as one checkpoint file in the original layout (``original_layout``). Returns ``path``."""
    save_file({k: v.contiguous() for k, v in original_layout(comp, dtype).items()}, str(path))
    return path


def original_layout(comp, dtype=torch.float32) -> dict:
    """Components' weights in the original layout: SD 1.5 (LDM, through ``exports.ldm_checkpoint``) or SDXL (SGM:
    its UNet and VAE the same way, CLIP-L under ``conditioner.embedders.0.transformer.``, OpenCLIP under
    ``conditioner.embedders.1.model.``)."""
    te = {} if comp.xl else _text_model(comp.text_encoder.state_dict())
    ckpt = exports.ldm_checkpoint(comp.unet.state_dict(), comp.vae.state_dict(), te, dict(comp.unet.config),
                                  dict(comp.vae.config), dtype=dtype)  # fmt: skip
    if comp.xl:
        ckpt |= {f"conditioner.embedders.0.transformer.{k}": v.to(dtype)
                 for k, v in _text_model(comp.text_encoder.state_dict()).items()}  # fmt: skip
        ckpt |= {f"conditioner.embedders.1.model.{k}": v.to(dtype)
                 for k, v in _openclip(comp.text_encoder_2.state_dict()).items()}  # fmt: skip
    return ckpt


def assert_same_weights(a, b) -> None:
    """Every weight of the networks of two ``Components`` is bit-identical, none missing."""
    for name in (*PARTS, *(("text_encoder_2",) if a.xl else ())):
        ours, theirs = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(ours) == set(theirs), name
        different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{name}: {different[:3]}"


@pytest.fixture(scope="module")
def sd15_file(offline_env, tmp_path_factory):
    return write_checkpoint(load_components("embedded:tiny-sd15"), tmp_path_factory.mktemp("sd15") / "m.safetensors")


@pytest.fixture(scope="module")
def sdxl_file(offline_env, tmp_path_factory):
    return write_checkpoint(load_components("embedded:tiny-sdxl"), tmp_path_factory.mktemp("xl") / "m.safetensors")


@pytest.mark.parametrize("ref", ["embedded:tiny-sd15", "embedded:world", "embedded:tiny-sdxl"])
def test_a_checkpoint_file_loads_the_folders_weights(ref, tmp_path):
    """The model written as one A1111-layout file loads (``model_config``: the folder's configs) into exactly the
    folder's weights, tokenizers and schedulers; its architecture is read from the file's keys."""
    folder = load_components(ref)
    path = write_checkpoint(folder, tmp_path / "model.safetensors")
    assert is_xl(str(path)) == folder.xl == (ref == "embedded:tiny-sdxl")
    loaded = load_components(str(path), model_config=ref)
    assert_same_weights(loaded, folder)
    assert loaded.xl == folder.xl and loaded.ref == str(path)
    assert loaded.noise_scheduler.config == folder.noise_scheduler.config
    assert type(loaded.base_scheduler) is type(folder.base_scheduler)
    prompt = ["a photo of sks robot, on a beach"]
    for ours, theirs in zip(loaded.tokenizers, folder.tokenizers, strict=True):
        assert ours(prompt, padding="max_length").input_ids == theirs(prompt, padding="max_length").input_ids
    assert all(not p.requires_grad for p in loaded.unet.parameters())


@pytest.mark.parametrize("name", ["sd15_file", "sdxl_file"])
def test_a_checkpoint_file_generates_what_the_folder_generates(name, request):
    """Three denoising steps through posebooth's generation code: the same images from the file as from the folder."""
    path = request.getfixturevalue(name)
    ref = "embedded:tiny-sdxl" if name == "sdxl_file" else "embedded:tiny-sd15"
    images = [
        np.asarray(
            generate(
                sd_pipeline(comp, "ddim"), "a photo of sks robot", [0, 1], steps=3, guidance_scale=4.0, resolution=32
            )[1]
        )  # fmt: skip
        for comp in (load_components(str(path), model_config=ref), load_components(ref))
    ]
    assert images[0].std() > 0 and np.array_equal(images[0], images[1])


def test_the_unet_alone_and_its_config_from_a_file(sd15_file, tiny_sd):
    """``load_unet`` (the fp32 reload for a ControlNet made ``from_unet`` under half precision: the file's stored
    weights, not bf16-rounded ones) and ``unet_config`` (exports) read a file base like a folder."""
    assert unet_config(str(sd15_file), "embedded:tiny-sd15") == unet_config("embedded:tiny-sd15")
    ours, theirs = load_unet(str(sd15_file), "embedded:tiny-sd15"), load_unet("embedded:tiny-sd15")
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert unet_config(str(sd15_file))["cross_attention_dim"] == 768  # the shipped SD 1.5 config
    half = load_components(str(sd15_file), precision="bf16", model_config="embedded:tiny-sd15").unet
    controlnet = load_controlnet("from_unet", half, "cpu", "fp32", str(sd15_file), "embedded:tiny-sd15")
    assert torch.equal(controlnet.down_blocks[0].resnets[0].conv1.weight, theirs.down_blocks[0].resnets[0].conv1.weight)


def test_exports_and_model_cards_of_a_subject_trained_on_a_file(sd15_file, tmp_path):
    """The UI exports read the base UNet's config through the file's ``model_config``; the model card loads the
    base with ``from_single_file``."""
    common = {"model": str(sd15_file), "model_config": "embedded:tiny-sd15"}
    (tmp_path / "provenance.json").write_text(json.dumps({"params": {"common": common}}))
    assert exports.unet_config_of(tmp_path) == unet_config("embedded:tiny-sd15")
    assert f'StableDiffusionPipeline.from_single_file("{sd15_file}")' in provenance.stage1_card(str(sd15_file), "x")
    assert 'from_pretrained("embedded:tiny-sd15")' in provenance.stage1_card("embedded:tiny-sd15", "x")


class _WritesAFile:
    """A pickle payload: unpickling it calls ``open(target, "w")``, as a malicious .ckpt would run code."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _WritesAFile(marker)}}, f, protocol=2)
    for call in (lambda: load_components(str(path)), lambda: is_xl(str(path))):
        with pytest.raises(ValueError, match=r"common.model: .*model.ckpt is a pickle .*weights_only=True.*run code"):
            call()
    assert not marker.exists()


def test_a_ckpt_of_tensors_only_loads_like_the_safetensors(sd15_file, tmp_path, monkeypatch):
    """A .ckpt that ``torch.load(weights_only=True)`` reads (tensors under ``state_dict``, as LDM saved them); its
    keys are read once (then from the cache), and again once the file changes."""
    from safetensors.torch import load_file

    reads = []
    real = single_file.load_pickle
    monkeypatch.setattr(single_file, "load_pickle", lambda p: reads.append(p) or real(p))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(sd15_file)), "global_step": 470000}, path)
    assert single_file.kind(str(path)) == "sd15"
    assert_same_weights(
        load_components(str(path), model_config="embedded:tiny-sd15"), load_components("embedded:tiny-sd15")
    )
    assert len(reads) == 1 and single_file.kind(str(path)) == "sd15" and len(reads) == 1
    state = load_file(str(sd15_file))
    del state["model.diffusion_model.input_blocks.0.0.weight"]
    torch.save({"state_dict": state}, path)  # replaced: read again (and now it lacks the UNet's first conv)
    assert "model.diffusion_model.input_blocks.0.0.weight" not in single_file.shapes(str(path)) and len(reads) == 2


def test_a_file_without_a_vae_takes_common_vae(sd15_file, tiny_sd, tmp_path):
    """``common.vae`` replaces the file's VAE, and a file that has none (some fine-tunes ship without) needs it."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").save_pretrained(tmp_path / "vae")
    state = {k: v for k, v in load_file(str(sd15_file)).items() if not k.startswith("first_stage_model.")}
    save_file(state, str(tmp_path / "novae.safetensors"))
    loaded = load_components(str(tmp_path / "novae.safetensors"), vae=str(tmp_path / "vae"), model_config=tiny_sd)
    assert_same_weights(loaded, load_components("embedded:tiny-sd15"))


def _keys_file(path, keys: dict[str, tuple]) -> str:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return str(path)


SD15 = {"model.diffusion_model.input_blocks.0.0.weight": (1, 4, 1, 1), "first_stage_model.decoder.conv_in.weight": (1,),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (1,)}  # fmt: skip
SDXL = {"model.diffusion_model.input_blocks.0.0.weight": (1, 4, 1, 1), "conditioner.embedders.0.transformer.x": (1,),
        "conditioner.embedders.1.model.positional_embedding": (1,)}  # fmt: skip


@pytest.mark.parametrize(
    "keys, expected",
    [
        (SD15, "sd15"),
        (SDXL, "sdxl"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (1,), "lora_te_x.alpha": ()}, "is a LoRA"),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (1,)}, "is a LoRA"),
        ({"encoder.conv_in.weight": (1,)}, r"no model.diffusion_model.\* keys"),
        (SD15 | {"model.diffusion_model.input_blocks.0.0.weight": (1, 9, 1, 1)}, "an inpainting model"),
        (SDXL | {"model.diffusion_model.input_blocks.0.0.weight": (1, 9, 1, 1)}, "an inpainting model"),
        ({"model.diffusion_model.x": (1,), "cond_stage_model.model.token_embedding.weight": (1,)}, "SD 2.x"),
        ({"model.diffusion_model.x": (1,), "conditioner.embedders.0.model.text_projection": (1,)}, "SDXL refiner"),
        (SD15 | {"v_pred": ()}, "v-prediction"),
        ({"model.diffusion_model.x": (1,), "first_stage_model.x": (1,)}, "neither SD 1.5's"),
    ],
)
def test_what_a_file_is_comes_from_its_keys(keys, expected, tmp_path):
    path = _keys_file(tmp_path / "m.safetensors", keys)
    assert single_file.safetensors_header(tmp_path / "m.safetensors") == {k: list(s) for k, s in keys.items()}
    if expected in ("sd15", "sdxl"):
        assert single_file.kind(path) == expected and is_xl(path) == (expected == "sdxl")
        return
    with pytest.raises(ValueError, match=rf"common.model: .*m.safetensors.* {expected}"):
        single_file.kind(path)


def test_clear_errors_for_a_missing_file_a_wrong_model_config_and_no_vae(sdxl_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"common.model: .*nowhere.safetensors does not exist"):
        load_components(str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match=r"common.model_config: 'embedded:tiny-sd15' is an SD 1.5 model but .* SDXL"):
        load_components(str(sdxl_file), model_config="embedded:tiny-sd15")
    with pytest.raises(ValueError, match=r"common.model: .*m.safetensors does not fit the SDXL configs in .*sdxl"):
        load_components(str(sdxl_file))  # the tiny model through the shipped full-size configs
    with pytest.raises(FileNotFoundError, match=r"common.model_config: .* \(no model_index.json\)"):
        load_components(str(sdxl_file), model_config=str(tmp_path))
    no_vae = _keys_file(tmp_path / "novae.safetensors", {k: s for k, s in SD15.items() if "first_stage" not in k})
    with pytest.raises(ValueError, match=r"has no VAE weights .*set common.vae"):
        load_components(no_vae)
    (tmp_path / "params.yaml").write_text(
        (ROOT / "params.yaml").read_text().replace('model_config: ""', "model_config: embedded:tiny-sd15")
    )
    with pytest.raises(config.ConfigError, match=r"common.model_config: .* is for a single-file common.model"):
        config.load(["common"], tmp_path / "params.yaml")
    assert config.MODEL_FILE_SUFFIXES == single_file.SAFE_SUFFIXES + single_file.PICKLE_SUFFIXES


def test_the_fingerprint_of_a_file_follows_its_content_not_its_place(sd15_file, tmp_path):
    """What the class-prior cache and the checkpoints key on: the same bytes elsewhere match, other bytes do not."""
    moved = tmp_path / "elsewhere" / sd15_file.name
    moved.parent.mkdir()
    shutil.copy(sd15_file, moved)
    assert weights_fingerprint(str(moved)) == weights_fingerprint(str(sd15_file))
    assert weights_fingerprint(str(moved)).startswith("m.safetensors@sha256:")
    with open(moved, "r+b") as f:  # one byte of the last tensor changed
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    changed = weights_fingerprint(str(moved))
    assert changed != weights_fingerprint(str(sd15_file))
    # the digest is kept under (path, size, modification time): read again only when one of them changes
    before = moved.stat().st_mtime_ns
    data = moved.read_bytes()
    moved.write_bytes(data[:-1] + bytes([data[-1] ^ 2]))
    os.utime(moved, ns=(before, before))
    assert weights_fingerprint(str(moved)) == changed
    os.utime(moved, ns=(before + 1, before + 1))
    assert weights_fingerprint(str(moved)) != changed


def test_stage1_trains_on_a_checkpoint_file(sd15_file, tmp_path, monkeypatch):
    """One LoRA step of train_stage1_appearance with ``common.model`` a file: the saved subject loads onto the
    file's pipeline and its provenance names the file; the model card loads it with ``from_single_file``."""
    import sys

    import yaml

    from posebooth import subject
    from stages import train_stage1_appearance as stage
    from tests.test_prior_batch import workspace

    params = workspace(tmp_path, monkeypatch, str(sd15_file), {})
    params["common"]["model_config"] = "embedded:tiny-sd15"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sys, "argv", ["train_stage1_appearance"])
    stage.main()
    out = tmp_path / "models" / "stage1"
    assert json.loads((out / "provenance.json").read_text())["params"]["common"]["model"] == str(sd15_file)
    assert "from_single_file" in (out / "README.md").read_text()
    pipe = sd_pipeline(load_components(str(sd15_file), model_config="embedded:tiny-sd15"), "ddim")
    assert subject.load_into(pipe, out)  # the LoRA matched the file's modules


def test_the_class_prior_cache_follows_a_file_models_content_and_configs(workdir, monkeypatch):
    """generate_class_priors looks its images up under a key that changes with the file's bytes and with
    ``common.model_config``, and stays put while neither changes (it stops before loading any model)."""
    import yaml

    (workdir / "m.safetensors").write_bytes(b"one")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    folder = first_lookup(workdir, monkeypatch, params)[0]
    file = first_lookup(workdir, monkeypatch, params, common__model="m.safetensors")[0]
    assert file != folder and file == first_lookup(workdir, monkeypatch, params, common__model="m.safetensors")[0]
    other = dict(common__model="m.safetensors", common__model_config="embedded:tiny-sd15")
    assert first_lookup(workdir, monkeypatch, params, **other)[0] != file
    (workdir / "m.safetensors").write_bytes(b"two")
    assert first_lookup(workdir, monkeypatch, params, common__model="m.safetensors")[0] != file


def test_the_shipped_configs_are_sd15s_and_sdxls(offline_env):
    """SD 1.5's are the benchmarks' byte-for-byte copies of the hub repo (their sizes: the next test); SDXL's
    second text encoder is OpenCLIP ViT-bigG's size; the tokenizers are the real CLIP one, SDXL's second padding
    with "!"."""
    for path in sorted((ROOT / "benchmarks" / "sd15_configs").rglob("*.json")):
        shipped = single_file.CONFIGS / "sd15" / path.relative_to(ROOT / "benchmarks" / "sd15_configs")
        assert shipped.read_bytes() == path.read_bytes(), shipped
    te = {n: json.loads((single_file.CONFIGS / c / n / "config.json").read_text())
          for c, n in (("sd15", "text_encoder"), ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2"))}  # fmt: skip
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim")
    assert [te["text_encoder_2"][k] for k in (*sizes, "hidden_act")] == [1280, 5120, 32, 20, 1280, "gelu"]
    assert [te["text_encoder"][k] for k in (*sizes, "hidden_act")] == [768, 3072, 12, 12, 768, "quick_gelu"]
    tok, tok2 = (single_file._tokenizer(single_file.CONFIGS / "sdxl", n) for n in ("tokenizer", "tokenizer_2"))
    assert len(tok) == 49408 and tok.pad_token == "<|endoftext|>" and tok2.pad_token == "!"  # noqa: S105
    ids = tok2("a photo", padding="max_length").input_ids
    assert ids[:4] == [49406, 320, 1125, 49407] and ids[4:] == [0] * 73  # "!" is token 0


def _shipped(kind: str, device: str = "meta", dtype=torch.float32) -> Components:
    """SD 1.5's or SDXL's networks built from the shipped configs: on the meta device (no memory), or on the CPU
    with random weights (``torch.empty`` filled from a seeded generator: no slow initialisation)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = single_file.CONFIGS / kind
    with init_empty_weights():
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if kind == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            )
    if device != "meta":
        generator = torch.Generator().manual_seed(0)
        for name, model in parts.items():
            parts[name] = model.to(dtype).to_empty(device=device)
            for p in parts[name].parameters():
                p.data.normal_(0, 0.02, generator=generator)
    return Components(None, parts["text_encoder"], parts["vae"], parts["unet"], None, kind,
                      text_encoder_2=parts.get("text_encoder_2"))  # fmt: skip


# SD 1.5's published sizes (benchmarks/sd15_configs/README.md) and SDXL base's UNet
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
SDXL_UNET_PARAMETERS = 2_567_463_684


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_full_size_original_layout_keys_are_detected(kind):
    """The key set of a full-size SD 1.5 or SDXL checkpoint (built on the meta device from the shipped configs)
    is recognised as what it is, and its UNet's first convolution takes 4 channels."""
    built = _shipped(kind)
    if kind == "sd15":
        assert {name: _count(getattr(built, name)) for name in PARTS} == SD15_PARAMETERS
    else:
        assert _count(built.unet) == SDXL_UNET_PARAMETERS
    keys = {k: list(v.shape) for k, v in original_layout(built).items()}
    assert len(keys) > 1000 and keys[single_file.CONV_IN] == [320, 4, 3, 3]
    assert single_file.detect(keys) == kind


@pytest.mark.slow
def test_a_full_size_sd15_checkpoint_round_trips_through_the_shipped_configs(tmp_path):
    """A full-size SD 1.5 with random fp16 weights (about 2 GB), written in the A1111 layout, loads back through
    the shipped configs (``model_config: ""``) into the same weights: the configs and the key detection at real
    size."""
    built = _shipped("sd15", "cpu", torch.float16)
    path = write_checkpoint(built, tmp_path / "sd15.safetensors", torch.float16)
    assert single_file.kind(str(path)) == "sd15" and single_file.config_folder(str(path)).endswith("sd15")
    loaded = load_components(str(path), precision="fp16")
    assert_same_weights(loaded, built)
    assert {name: _count(getattr(loaded, name)) for name in PARTS} == SD15_PARAMETERS
    assert type(loaded.base_scheduler).__name__ == "PNDMScheduler" and len(loaded.tokenizer) == 49408


@pytest.mark.slow
def test_sdxls_full_size_openclip_text_encoder_converts_through_the_shipped_config():
    """SDXL's second text encoder at full size (OpenCLIP ViT-bigG, 695 M parameters, random fp16: 1.4 GB) in the
    original layout, converted back by diffusers' single-file CLIP loader with the shipped ``text_encoder_2``
    config: the same weights. (The whole SDXL in fp16, 7 GB, is too big for a test; its UNet's size and keys
    are checked on the meta device above.)"""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    built = _shipped("sdxl", "meta").text_encoder_2.to(torch.float16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    for p in built.parameters():
        p.data.normal_(0, 0.02, generator=generator)
    ckpt = {f"conditioner.embedders.1.model.{k}": v for k, v in _openclip(built.state_dict()).items()}
    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, ckpt, subfolder="text_encoder_2", config=str(single_file.CONFIGS / "sdxl"),
        torch_dtype=torch.float16, local_files_only=True,
    )  # fmt: skip
    assert _count(loaded) == 694_659_840
    ours, theirs = built.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
