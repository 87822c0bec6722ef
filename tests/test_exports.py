"""The UI exports (posebooth/exports.py) against the UIs' own loading rules and diffusers' own loaders.

No UI installs here, so each UI's key-matching rule is re-stated in a few lines from its source, on the
full-size SD 1.5 and SDXL architectures built on the meta device (no weights, no download):
- ComfyUI ``comfy/lora.py``: ``model_lora_keys_unet`` (``lora_unet_`` + the original UNet key with ``_``, or
  + the diffusers key with ``_``), ``model_lora_keys_clip`` (``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` +
  ``text_model_encoder_layers_{i}_{LORA_CLIP_MAP}``) and ``load_lora`` (every key not consumed is "not loaded").
- AUTOMATIC1111 ``extensions-builtin/Lora/networks.py``: ``convert_diffusers_name_to_compvis``, then
  ``load_network``'s look-up in ``network_layer_mapping`` (the original model's module names with ``_``), the
  ``re_x_proj`` fallback onto OpenCLIP's fused attention, and the ``lora_unet`` / ``lora_te1_text_model`` fallbacks.
- ComfyUI ``comfy/controlnet.py`` ``load_controlnet_state_dict`` and sd-webui-controlnet
  ``controlnet_model_guess.py``: a ``control_model.`` prefixed original-layout ControlNet with ``input_hint_block``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from posebooth import exports
from posebooth.exports import Subject
from posebooth.lora import LORA_FILE, add_text_encoder_lora, add_unet_lora, save_unet_lora
from posebooth.models import load_components
from tests.workspace import gpu_check_module

# SDXL base 1.0's published unet/config.json, where it differs from SD 1.5's (benchmarks/sd15_configs), and its
# second text encoder (OpenCLIP ViT-bigG/14 as transformers' CLIPTextModelWithProjection).
SDXL_UNET = dict(
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    sample_size=128,
)  # fmt: skip
SDXL_TE2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                projection_dim=1280, hidden_act="gelu")  # fmt: skip
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}  # ComfyUI comfy/lora.py  # fmt: skip


@pytest.fixture(scope="module")
def full_size():
    """SD 1.5's and SDXL's UNet and text encoders at full size on the meta device: ``{"sd15": ..., "sdxl": ...}``."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = gpu_check_module().load_configs()
    te = CLIPTextConfig.from_dict(configs["text_encoder"])
    with init_empty_weights():
        sd15 = {"unet": UNet2DConditionModel.from_config(configs["unet"]), "text_encoder": CLIPTextModel(te)}
        sdxl = {
            "unet": UNet2DConditionModel.from_config(configs["unet"] | SDXL_UNET),
            "text_encoder": CLIPTextModel(te),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder"] | SDXL_TE2)),
        }
    # SDXL base's published size: 2.567 B parameters in its UNet
    assert sum(p.numel() for p in sdxl["unet"].parameters()) == 2_567_463_684
    return {"sd15": sd15, "sdxl": sdxl}


def _original_unet_keys(unet) -> set[str]:
    """The original-layout UNet keys, as diffusers' own single-file converter maps them back (so the names the
    exports use are checked against diffusers' inverse, not against themselves)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = list(unet.state_dict())
    config = dict(unet.config)
    ldm = {
        "model.diffusion_model." + exports.ldm_unet_key(k, config): torch.tensor(float(i)) for i, k in enumerate(keys)
    }
    back = convert_ldm_unet_checkpoint(ldm, config)
    assert {k: keys[int(v)] for k, v in back.items()} == {k: k for k in keys}  # each key back to itself
    return {k[len("model.") :] for k in ldm}  # diffusion_model.…


def _lora_on_every_layer(model_parts: dict) -> tuple[dict, dict]:
    """A diffusers-format LoRA (rank 1, tensors of one number: only keys matter) on every Linear and Conv2d of
    the UNet and on every attention and MLP projection of the text encoders; and its adapter config."""
    state = {}
    for part, model in model_parts.items():
        for name, module in model.named_modules():
            if part == "unet" and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                state[f"unet.{name}.lora.down.weight"] = state[f"unet.{name}.lora.up.weight"] = torch.ones(1, 1)
            elif part != "unet" and re.search(r"(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])$", name):
                name = name.removeprefix("text_model.")  # as diffusers saves text-encoder LoRAs
                for d in ("down", "up"):
                    state[f"{part}.{name}.lora_linear_layer.{d}.weight"] = torch.ones(1, 1)
    return state, {part: {"lora_alpha": 0.5, "r": 1} for part in model_parts}


def _comfyui_key_map(parts: dict, xl: bool) -> dict[str, str]:
    """ComfyUI comfy/lora.py ``model_lora_keys_unet`` + ``model_lora_keys_clip``: kohya name → model key."""
    key_map = {}
    unet = parts["unet"]
    for k in _original_unet_keys(unet):  # (diffusion_model.…)
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = k
    for k in unet.state_dict():  # unet_to_diffusers: every diffusers UNet key, by the same rule
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = k
    clips = [("clip_l", ["lora_te_", "lora_te1_"] if not xl else ["lora_te1_"])] + (
        [("clip_g", ["lora_te2_"])] if xl else []
    )
    for (clip, prefixes), part in zip(clips, ("text_encoder", "text_encoder_2"), strict=False):
        for b in range(parts[part].config.num_hidden_layers):
            for c, lora in LORA_CLIP_MAP.items():
                for prefix in prefixes:
                    key_map[f"{prefix}text_model_encoder_layers_{b}_{lora}"] = f"{clip}.layers.{b}.{c}.weight"
    return key_map


def _comfyui_unloaded(lora: dict, key_map: dict) -> tuple[list[str], int]:
    """ComfyUI ``load_lora``: the keys left unloaded, and how many modules it patches."""
    loaded, modules = set(), 0
    for x in key_map:
        if f"{x}.lora_up.weight" in lora:
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"} & set(lora)
            modules += 1
    return sorted(set(lora) - loaded), modules


A1111_UNET_RULES = [  # extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis (SD-shaped: 3 per block)
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
               f"{_A1111_RESNET.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
               f"{_A1111_RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
               f"{_A1111_RESNET.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
    (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
     lambda m: f"1_model_transformer_resblocks_{m[1]}_"
               + m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")),
]  # fmt: skip
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}  # fmt: skip


def _a1111_layer_names(parts: dict, xl: bool) -> set[str]:
    """``assign_network_names_to_compvis_modules``: the original model's module names with ``_``. The UNet's
    from the original keys; CLIP-L's are transformers' under ``transformer.`` (SDXL: embedder ``0_``);
    OpenCLIP's (SDXL embedder ``1_``) are ``model.transformer.resblocks.{i}`` with a fused ``attn``."""
    names = {k.rsplit(".", 1)[0].replace(".", "_") for k in _original_unet_keys(parts["unet"])}
    for n, _ in parts["text_encoder"].named_modules():  # (transformers 4, which A1111 runs, nests text_model)
        n = n if n.startswith("text_model") else f"text_model.{n}"
        names.add(("0_" if xl else "") + "transformer_" + n.replace(".", "_"))
    if xl:
        for i in range(parts["text_encoder_2"].config.num_hidden_layers):
            names |= {
                f"1_model_transformer_resblocks_{i}_{m}" for m in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")
            }
    return names


def _a1111_failed(lora: dict, names: set[str]) -> tuple[dict, int]:
    """``load_network``: the keys that fail to match, and how many modules match."""
    failed, matched = {}, set()
    for key_network in lora:
        base, _ = key_network.split(".", 1)
        key = base
        for rule, to in A1111_UNET_RULES:
            if m := re.match(rule, base):
                key = to(m)
                break
        found = key in names
        if not found and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
            found = m[1] in names
        if not found and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            found = key in names
        elif not found and "lora_te1_text_model" in base:
            found = base.replace("lora_te1_text_model", "0_transformer_text_model") in names or base.replace(
                "lora_te1_text_model", "transformer_text_model") in names  # fmt: skip
        if found:
            matched.add(base)
        else:
            failed[key_network] = key
    return failed, len(matched)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_lora_on_every_layer_matches_every_module_in_comfyui_and_a1111(full_size, arch, tmp_path):
    """Full-size architecture, a LoRA on every UNet layer and every text-encoder projection: each exported key
    maps to a module in both UIs, none is left unloaded, each module has the trained alpha."""
    parts, xl = full_size[arch], arch == "sdxl"
    state, config = _lora_on_every_layer(parts)
    lora = exports.kohya_lora(state, config, dict(parts["unet"].config), xl)
    modules = {k.split(".")[0] for k in lora}
    assert all(f"{m}.alpha" in lora and lora[f"{m}.alpha"].item() == 0.5 for m in modules)
    assert len(lora) == 3 * len(modules) == 3 * len(state) // 2
    unloaded, patched = _comfyui_unloaded(lora, _comfyui_key_map(parts, xl))
    assert unloaded == [] and patched == len(modules)
    failed, matched = _a1111_failed(lora, _a1111_layer_names(parts, xl))
    assert failed == {} and matched == len(modules)
    # SDXL: kohya's SDXL naming (original blocks), not diffusers'; SD 1.5: kohya's SD 1.5 naming (diffusers')
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in lora) == xl
    assert any(k.startswith("lora_te2_") for k in lora) == xl


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_original_layout_names_are_what_diffusers_single_file_loaders_invert(full_size, arch):
    """UNet, ControlNet (and SD 1.5's VAE) names in the original layout map back, one to one, through diffusers'
    ``single_file_utils`` converters (the UNet part is checked inside ``_original_unet_keys``)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, convert_ldm_vae_checkpoint

    unet = full_size[arch]["unet"]
    assert len(_original_unet_keys(unet)) == len(unet.state_dict())
    with init_empty_weights():
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    keys = list(controlnet.state_dict())
    ldm = {f"control_model.{exports.ldm_unet_key(k, dict(controlnet.config))}": torch.tensor(float(i))
           for i, k in enumerate(keys)}  # fmt: skip
    back = {k: keys[int(v)] for k, v in convert_controlnet_checkpoint(ldm, dict(controlnet.config)).items()}
    # (diffusers' ControlNet converter has no entry for SDXL's add_embedding, label_emb in the original layout,
    # which ComfyUI's unet_to_diffusers and sd-webui-controlnet's SDXL config do read)
    assert back == {k: k for k in keys if not k.startswith("add_embedding.")}
    assert all(k.startswith("control_model.") for k in ldm) and "control_model.input_hint_block.14.weight" in ldm
    if arch == "sd15":
        with init_empty_weights():
            vae = AutoencoderKL.from_config(gpu_check_module().load_configs()["vae"])
        vkeys = list(vae.state_dict())
        ldm = {"first_stage_model." + exports.ldm_vae_key(k, 4): torch.zeros(1, 1) for k in vkeys}
        assert set(convert_ldm_vae_checkpoint(ldm, dict(vae.config))) == set(vkeys)


def _tiny_lora(ref: str, folder, alpha: float, text_encoder: bool):
    """A trained-looking LoRA (random B) on the tiny model's UNet and, with ``text_encoder``, its text encoders."""
    comp = load_components(ref)
    add_unet_lora(comp.unet, 4, alpha, ["to_q", "to_k", "to_v", "to_out.0"])
    if text_encoder:
        for i, encoder in enumerate(comp.text_encoders):
            add_text_encoder_lora(encoder, 4, alpha, skip_last_layer=comp.xl and i == 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in [comp.unet, *comp.text_encoders]:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2, generator=gen)
    te = (comp.text_encoder, comp.text_encoder_2) if text_encoder else (None, None)
    return save_unet_lora(comp.unet, folder, te[0], text_encoder_2=te[1], xl=comp.xl), comp


@pytest.mark.parametrize("ref", ["embedded:tiny-sd15", "embedded:tiny-sdxl"])
def test_kohya_export_with_a_text_encoder_lora_loads_like_the_diffusers_file(ref, tmp_path):
    """The bug case: a text-encoder LoRA next to the UNet's. Every module in kohya's names with the trained
    alpha (2, rank 4), the metadata, and the same images through diffusers' ``load_lora_weights``."""
    diffusers_file, comp = _tiny_lora(ref, tmp_path, alpha=2.0, text_encoder=True)
    subject = Subject("sks", "robot", "lora", ref, comp.xl, 32)
    out = exports.export_kohya(
        diffusers_file, tmp_path / f"{subject.stem}.safetensors", dict(comp.unet.config), subject
    )
    assert out.name == "sks_robot_lora.safetensors"
    lora = load_file(str(out))
    modules = {k.split(".")[0] for k in lora}
    assert {k.split(".", 1)[1] for k in lora} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(lora[f"{m}.alpha"].item() == 2.0 for m in modules)
    prefixes = {re.match(r"lora_(unet|te1?|te2)_", m)[0] for m in modules}
    assert prefixes == ({"lora_unet_", "lora_te1_", "lora_te2_"} if comp.xl else {"lora_unet_", "lora_te_"})
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["modelspec.trigger_phrase"] == "sks robot"
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if comp.xl else "sd_v1")
    assert meta["modelspec.architecture"] == (
        "stable-diffusion-xl-v1-base/lora" if comp.xl else "stable-diffusion-v1/lora"
    )
    assert json.loads(meta["ss_tag_frequency"]) == {"instance": {"sks robot": 1}}

    from posebooth import embedded

    cls = StableDiffusionXLPipeline if comp.xl else StableDiffusionPipeline

    def images(weight_name=None):
        pipe = cls.from_pretrained(embedded.resolve(ref), **({} if comp.xl else dict(safety_checker=None,
                                   requires_safety_checker=False)))  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        if weight_name:
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        return pipe("a photo of sks robot", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    via_diffusers, via_kohya, without = images(LORA_FILE), images(out.name), images()
    assert abs(via_diffusers - via_kohya).max() < 1e-4
    assert abs(via_diffusers - without).max() > 1e-3


def test_stage2_lora_export_takes_stage1_text_encoder_lora(tmp_path):
    """The continued UNet LoRA of stage 2 carries stage 1's text-encoder LoRA, as ``generate`` combines them."""
    stage1, _ = _tiny_lora("embedded:tiny-sd15", tmp_path / "stage1", alpha=2.0, text_encoder=True)
    stage2, comp = _tiny_lora("embedded:tiny-sd15", tmp_path / "stage2", alpha=2.0, text_encoder=False)
    subject = Subject("sks", "robot", "lora", "embedded:tiny-sd15", False, 32)
    out = exports.export_kohya(stage2, tmp_path / "pose.safetensors", dict(comp.unet.config), subject, stage1)
    lora, first, second = load_file(str(out)), load_file(str(stage1)), load_file(str(stage2))
    te = [k for k in lora if k.startswith("lora_te_")]
    assert te and len(te) == 1.5 * sum(k.startswith("text_encoder.") for k in first)
    unet_down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert torch.equal(
        lora[unet_down], second["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"]
    )


def test_full_checkpoint_loads_in_diffusers_from_single_file(tiny_sd, tmp_path):
    """``full``: one fp16 original-layout file that ``from_single_file`` reads back into the same weights; a
    token added to the tokenizer leaves as ``<identifier>.safetensors``, the table cut to CLIP's 49408 rows."""
    import shutil
    from pathlib import Path

    folder = tmp_path / "stage1"
    shutil.copytree(tiny_sd, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.tokenizer.add_tokens("<sks>")
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    pipe.save_pretrained(folder)
    subject = Subject("sks", "robot", "full", "embedded:tiny-sd15", False, 32)
    ckpt, embedding = exports.export_checkpoint(Path(folder), tmp_path / "out" / f"{subject.stem}.safetensors", subject)
    assert embedding.name == "sks.safetensors" and load_file(str(embedding))["emb_params"].shape == (1, 32)
    with safe_open(str(ckpt), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1"
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    loaded = StableDiffusionPipeline.from_single_file(str(ckpt), config=tiny_sd, safety_checker=None,
                                                      requires_safety_checker=False)  # fmt: skip
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(ours) == set(theirs), name
        for k, v in theirs.items():
            want = ours[k][:49408] if "token_embedding" in k else ours[k]
            assert torch.equal(v, want.half().to(v.dtype)), k


def test_controlnet_export_fuses_its_lora_and_loads_from_single_file(tiny_sd, tmp_path):
    """A ControlNet LoRA fused into its base, one fp16 file: ``from_single_file`` gives the LoRA'd residuals."""
    from posebooth.lora import add_controlnet_lora

    comp = load_components("embedded:tiny-sd15")
    controlnet = ControlNetModel.from_unet(comp.unet)
    controlnet.save_pretrained(tmp_path / "base")
    add_controlnet_lora(controlnet, 4, 2.0)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    subject = Subject("sks", "robot", "lora", "embedded:tiny-sd15", False, 32)
    out = exports.export_controlnet(controlnet, tmp_path / "cn.safetensors", subject)
    state = load_file(str(out))
    assert all(k.startswith("control_model.") and v.dtype == torch.float16 for k, v in state.items())
    assert "control_model.input_hint_block.0.weight" in state and not any("lora" in k for k in state)
    loaded = ControlNetModel.from_single_file(str(out), config=str(tmp_path / "base")).float()
    sample, cond = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 32, 32)
    context = torch.randn(1, 77, comp.unet.config.cross_attention_dim)
    base = ControlNetModel.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        want, got, without = (m(sample, 10, context, cond, return_dict=False)[1] for m in (controlnet, loaded, base))
    assert (want - got).abs().max() < 2e-3 < (want - without).abs().max()


@pytest.mark.parametrize("xl", [False, True])
def test_embedding_export_is_named_after_the_trigger(tmp_path, xl):
    """``<identifier>.safetensors``: SD 1.5 one tensor ``emb_params`` (A1111 takes the only tensor, ComfyUI the
    first value); SDXL ``clip_l`` and ``clip_g`` (ComfyUI's ``embed_key``s); diffusers reads it with ``token=``."""
    from safetensors.torch import save_file

    rows = {"clip_l": torch.randn(1, 8), "clip_g": torch.randn(1, 16)} if xl else {"sks": torch.randn(1, 8)}
    save_file(rows, str(tmp_path / "learned_embeds.safetensors"))
    subject = Subject("sks", "robot", "textual_inversion", "x", xl, 32)
    out = exports.export_embedding(tmp_path / "learned_embeds.safetensors", tmp_path / "exports", subject)
    assert out.name == "sks.safetensors"
    state = load_file(str(out))
    if xl:
        assert state.keys() == {"clip_l", "clip_g"} and torch.equal(state["clip_g"], rows["clip_g"])
    else:
        assert list(state) == ["emb_params"] and torch.equal(state["emb_params"], rows["sks"])
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.architecture"].endswith("/textual-inversion")


def test_safetensors_header_is_the_same_from_process_to_process(tmp_path):
    """Many metadata entries: the file's bytes do not depend on hash-map order (DVC sees the same file)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from pathlib import Path; from posebooth.exports import save_safetensors;"
        "save_safetensors({'b': torch.ones(2), 'a': torch.zeros(3)}, Path(sys.argv[1]), {f'k{i}': str(i) for i in range(20)})"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], check=True)
    exports.save_safetensors(
        {"b": torch.ones(2), "a": torch.zeros(3)}, tmp_path / "b", {f"k{i}": str(i) for i in range(20)}
    )
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert load_file(str(tmp_path / "a"))["b"].tolist() == [1.0, 1.0]


def test_export_command_writes_every_export_from_the_trained_folders(tmp_path, capsys):
    """``posebooth export``: from stage 1's LoRA and stage 2's ControlNet and continued LoRA, named from the
    params recorded in provenance.json: the kohya LoRA, the ControlNet file and the stage-2 LoRA."""
    from posebooth import cli, outputs

    _tiny_lora("embedded:tiny-sd15", tmp_path / "stage1", alpha=2.0, text_encoder=True)
    params = {"common": {"identifier": "sks", "class_noun": "teddy bear", "model": "embedded:tiny-sd15",
                         "resolution": 32}, "train": {"method": "lora"}}  # fmt: skip
    outputs.write_json(tmp_path / "stage1" / "provenance.json", {"params": params})
    _tiny_lora("embedded:tiny-sd15", tmp_path / "stage2" / "unet_lora", alpha=2.0, text_encoder=False)
    unet = load_components("embedded:tiny-sd15").unet  # (from_unet needs one without a LoRA)
    ControlNetModel.from_unet(unet).save_pretrained(tmp_path / "stage2" / "controlnet")
    outputs.write_json(tmp_path / "stage2" / "provenance.json", {"params": params})
    cli.main(["export", "--stage1", str(tmp_path / "stage1"), "--stage2", str(tmp_path / "stage2"),
              "--out", str(tmp_path / "exports")])  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "exports").iterdir())
    assert names == ["sks_teddy-bear_lora.safetensors", "sks_teddy-bear_lora_openpose_controlnet.safetensors",
                     "sks_teddy-bear_lora_pose.safetensors"]  # fmt: skip
    assert capsys.readouterr().out.count(".safetensors") == 3
    assert any(k.startswith("lora_te_") for k in load_file(str(tmp_path / "exports" / names[2])))
    # train_stage2_pose passes its command-line strings, not paths (the first slow-tier run stopped on that).
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    again = exports.write_stage2(stage2, stage1, str(tmp_path / "again"), exports.subject_of(stage1), dict(unet.config))
    assert sorted(p.name for p in again) == names[1:]
