"""Exports every UI loads: the trained subject and ControlNet as single files for AUTOMATIC1111/Forge and ComfyUI.

What the stages save is in diffusers' layouts (``pipe.load_lora_weights(folder)``, ``from_pretrained``). The
UIs read other layouts, written here into an ``exports/`` folder (``write_stage1``, ``write_stage2``; the
``posebooth export`` command and, by default, the end of both training stages):

- LoRA → kohya's layout (``lora_unet_…``, ``lora_te_…`` / ``lora_te1_…``, ``lora_te2_…``; ``lora_down``,
  ``lora_up`` and the trained ``alpha`` per module), with kohya's ``ss_*`` and Stability's ``modelspec.*``
  metadata. SD 1.5 keeps diffusers' block names after the prefix (kohya's own SD 1.5 LoRAs do), SDXL uses the
  original (SGM) block names (``input_blocks.4.1…``), as kohya's SDXL LoRAs do. DoRA, LoHa and LoKr
  (``train.adapter``) → LyCORIS's keys under the same module names (``kohya_lora``); DoRA's ``dora_scale``
  is computed from the base model's weights (``dora_scale``), so it is written only where those are at hand.
- ``full`` → one SD 1.5 checkpoint in the original (LDM) layout, fp16.
- ControlNet (full, or its LoRA fused into its base) → one fp16 file in the original layout
  (``control_model.…``), which sd-webui-controlnet, ComfyUI and diffusers' ``from_single_file`` read.
- textual inversion → ``<identifier>.safetensors`` (``emb_params``; SDXL: ``clip_l`` and ``clip_g``): both UIs
  take the file name as the word that calls it.

The key maps below are adapted from diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``
and ``convert_diffusers_to_original_sdxl.py`` (Apache-2.0), generalised to any block count and
``layers_per_block``. Their inverse is diffusers' own ``single_file_utils``, which the tests run on them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BaseWeights = Callable[[str, str], torch.Tensor]  # (part, module path) → the base model's weight of that module

CLIP_VOCAB = 49408  # rows of the CLIP tokenizers' embedding tables (what single-file loaders build)

# ---------------------------------------------------------------------------------------------------------
# diffusers names → original (LDM / SGM) names

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text and time-ids embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "controlnet_mid_block": "middle_block_out.0",
}


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "")


def ldm_unet_key(name: str, config: dict) -> str:
    """The original (LDM for SD 1.5, SGM for SDXL) name of a diffusers UNet or ControlNet parameter or module
    ``name`` (e.g. ``down_blocks.1.attentions.0.proj_in.weight`` → ``input_blocks.4.1.proj_in.weight``).

    ``config``: the UNet's (or ControlNet's) config. Each down block is ``layers_per_block`` entries of
    ``input_blocks`` (resnet ``.0``, attention ``.1``) and one for its downsampler; each up block
    ``layers_per_block + 1`` entries of ``output_blocks``, its upsampler in the last.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block {layers!r}: only one number for every block is supported")
    for prefix, ldm in _UNET_TOP.items():
        if name == prefix or name.startswith(prefix + "."):
            return ldm + name[len(prefix) :]
    p = name.split(".")

    def inner(kind: str, rest: list[str]) -> str:  # a resnet's or an attention's own layers
        return _join(_RESNET.get(rest[0], rest[0]), *rest[1:]) if kind == "resnets" and rest else _join(*rest)

    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":  # down_blocks.b.downsamplers.0.conv.weight
            return _join("input_blocks", (b + 1) * (layers + 1), 0, "op", *p[5:])
        return _join("input_blocks", 1 + b * (layers + 1) + int(p[3]), int(p[2] == "attentions"), inner(p[2], p[4:]))
    if p[0] == "mid_block":  # resnet, attention, resnet
        i = int(p[2])
        return _join("middle_block", 1 if p[1] == "attentions" else 2 * i, inner(p[1], p[3:]))
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":
            with_attention = "CrossAttn" in config["up_block_types"][b]
            return _join("output_blocks", b * (layers + 1) + layers, 2 if with_attention else 1, "conv", *p[5:])
        return _join("output_blocks", b * (layers + 1) + int(p[3]), int(p[2] == "attentions"), inner(p[2], p[4:]))
    if p[0] == "controlnet_down_blocks":  # the zero convolutions
        return _join("zero_convs", p[1], 0, *p[2:])
    if p[0] == "controlnet_cond_embedding":  # the pose encoder: convs at even indices of input_hint_block
        if p[1] == "conv_in":
            return _join("input_hint_block", 0, *p[2:])
        if p[1] == "blocks":
            return _join("input_hint_block", 2 * int(p[2]) + 2, *p[3:])
        if p[1] == "conv_out":
            blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
            return _join("input_hint_block", 2 * blocks + 2, *p[2:])
    raise ValueError(f"{name}: no original-layout name known for this UNet/ControlNet key")


def ldm_vae_key(name: str, up_blocks: int) -> str:
    """The original (LDM) name of a diffusers ``AutoencoderKL`` parameter (without ``first_stage_model.``)."""
    p = name.split(".")
    rest = p
    if len(p) > 3 and p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2]) if p[1] == "down_blocks" else up_blocks - 1 - int(p[2])  # the decoder's run backwards
        level = "down" if p[1] == "down_blocks" else "up"
        if p[3] == "resnets":
            rest = [p[0], level, str(i), "block", *p[4:]]
        else:  # downsamplers.0.conv / upsamplers.0.conv
            rest = [p[0], level, str(i), "downsample" if level == "down" else "upsample", *p[5:]]
    elif len(p) > 3 and p[1] == "mid_block":
        if p[2] == "resnets":
            rest = [p[0], "mid", f"block_{int(p[3]) + 1}", *p[4:]]
        else:
            attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            tail = p[5:] if p[4] != "to_out" else p[6:]  # to_out.0.weight
            rest = [p[0], "mid", "attn_1", attn[p[4]], *tail]
    elif len(p) > 1 and p[1] == "conv_norm_out":
        rest = [p[0], "norm_out", *p[2:]]
    return ".".join(rest).replace("conv_shortcut", "nin_shortcut")


# ---------------------------------------------------------------------------------------------------------
# What the exports are named and the metadata they carry


@dataclass(frozen=True)
class Subject:
    """What an export's name and metadata say: the trigger word, the class, the method, the base."""

    identifier: str
    class_noun: str
    method: str  # train.method
    base_model: str
    xl: bool
    resolution: int

    @classmethod
    def from_params(cls, params: dict, xl: bool) -> Subject:
        """From a config as ``Config.as_dict()`` gives it (also the ``params`` of a provenance.json)."""
        c = params["common"]
        method = params.get("train", {}).get("method", "lora")
        return cls(c["identifier"], c["class_noun"], method, c["model"], xl, c["resolution"])

    @property
    def trigger(self) -> str:
        return f"{self.identifier} {self.class_noun}"

    @property
    def stem(self) -> str:
        """``<identifier>_<class>_<method>``: the trigger word and the experiment, safe as a file name."""
        parts = (self.identifier, self.class_noun, self.method)
        return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", s).strip("-") for s in parts)

    @property
    def architecture(self) -> str:
        """modelspec's architecture id (kohya-ss/sd-scripts ``library/sai_model_spec.py``)."""
        return "stable-diffusion-xl-v1-base" if self.xl else "stable-diffusion-v1"


SGM = "https://github.com/Stability-AI/generative-models"


def modelspec(s: Subject, kind: str, title: str, implementation: str) -> dict[str, str]:
    """Stability's ModelSpec 1.0.0 entries (``kind``: ``lora``, ``textual-inversion``, ``controlnet`` or
    ``""`` for a checkpoint). No ``modelspec.date``: the same training gives the same bytes (DVC)."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{s.architecture}/{kind}" if kind else s.architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{s.resolution}x{s.resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": s.trigger,
        "modelspec.usage_hint": f"Use '{s.trigger}' in the prompt",
        "modelspec.description": f"posebooth {s.method} of '{s.trigger}' on {s.base_model}",
    }


# LyCORIS's network args (``lycoris/kohya.py`` ``create_network``) as sd-scripts records them in ``ss_network_args``
LYCORIS_ARGS = {
    # a DoRA: LyCORIS's LoRA with weight decomposition on the output axis (create_network's dora_wd, wd_on_output;
    # sd-scripts records --network_args values as the strings given)
    "dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"},
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr"},
    "full": {"algo": "full"},  # full diffs (W' − W per module; ``full_diffs``)
}


def lora_metadata(s: Subject, rank: int, alpha: float, title: str, kind: str = "lora") -> dict[str, str]:
    """kohya's ``ss_*`` entries (sd-scripts ``train_network.py``) and the modelspec ones, for a LoRA; a DoRA,
    LoHa or LoKr is a LyCORIS network (``ss_network_module: lycoris.kohya`` and its ``algo`` in
    ``ss_network_args``), as sd-scripts writes one trained with ``--network_module lycoris.kohya``."""
    network = {"ss_network_module": "networks.lora"}
    if kind != "lora":
        network = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(LYCORIS_ARGS[kind])}
    return {
        "ss_base_model_version": "sdxl_base_v1-0" if s.xl else "sd_v1",
        **network,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_output_name": title,
        "ss_sd_model_name": s.base_model,
        "ss_v2": "False",
        "ss_resolution": f"({s.resolution}, {s.resolution})",
        # A1111's LoRA card lists these as the training tags: the trigger phrase, once per image folder
        "ss_tag_frequency": json.dumps({"instance": {s.trigger: 1}}),
        "ss_training_comment": f"trigger: {s.trigger}",
    } | modelspec(s, "lora", title, SGM if s.xl else "diffusers")  # kohya's rule: SDXL LoRAs are SGM-named


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the header's keys sorted: safetensors writes the metadata in
    hash-map order, which changes from process to process, and DVC would see a new file for the same weights.
    The header is rewritten in place (same length: the same entries in another order)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata=metadata)
    with path.open("r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        body = raw.rstrip(b" ")
        header = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(header) != len(body):
            raise ValueError(f"{path}: the sorted safetensors header has another length; not rewritten")
        f.seek(8)
        f.write(header + raw[len(body) :])
    return path


# ---------------------------------------------------------------------------------------------------------
# LoRA: diffusers → kohya

# A saved adapter weight: diffusers' LoRA keys (``lora.down``, ``lora_linear_layer.up``, PEFT's ``lora_A``; DoRA's
# ``lora_magnitude_vector``) and PEFT's LoHa / LoKr ones (``hada_w1_a``, ``lokr_w1``, ``lokr_w2_b`` ...)
_LORA_KEY = re.compile(
    r"^(?P<part>unet|text_encoder_2|text_encoder)\.(?P<module>.+)\."
    r"(?:(?:lora\.(?P<a>down|up)|lora_linear_layer\.(?P<b>down|up)|lora_(?P<c>A|B))\.weight"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?|(?P<lycoris>hada_w[12]_[ab]|lokr_w[12](?:_[ab])?))$"
)


def kohya_module_name(part: str, module: str, unet_config: dict, xl: bool) -> str:
    """kohya's name of a LoRA'd module: ``part`` is ``unet``, ``text_encoder`` or ``text_encoder_2``,
    ``module`` its diffusers/transformers path."""
    if part == "unet":
        return "lora_unet_" + (ldm_unet_key(module, unet_config) if xl else module).replace(".", "_")
    module = module if module.startswith("text_model.") else "text_model." + module
    prefix = {"text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}[part]
    return prefix + module.replace(".", "_")


def lora_config(path: Path) -> dict[str, dict]:
    """Per part (``unet``, ``text_encoder``…), the adapter config diffusers saved in the LoRA file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    parts: dict[str, dict] = {}
    for key, value in meta.items():
        part, _, field = key.partition(".")
        parts.setdefault(part, {})[field] = value
    return parts


def adapter_kind(cfg: dict) -> str:
    """``lora``, ``dora``, ``loha`` or ``lokr``: a part's saved adapter config (diffusers' LoRA metadata or
    PEFT's ``adapter_config.json``)."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type in ("LOHA", "LOKR"):
        return peft_type.lower()
    return "dora" if cfg.get("use_dora") else "lora"


def _alpha_and_rank(part: str, cfg: dict) -> tuple[float, int]:
    if cfg.get("alpha_pattern") or cfg.get("rank_pattern") or cfg.get("use_rslora"):
        raise ValueError(f"{part}: an adapter with per-module alphas or ranks, or rsLoRA, has no kohya export here")
    alpha = cfg.get("lora_alpha", cfg.get("alpha"))
    if alpha is None or "r" not in cfg:
        raise ValueError(f"{part}: the adapter's saved config has no alpha or r; save it with save_unet_lora")
    return float(alpha), int(cfg["r"])


# PEFT's DoRA magnitude m rescales each output row of the merged weight M = W + (α/r)·B·A to norm m (LyCORIS's
# wd_on_output, whose own dora_scale is m itself). ComfyUI and Forge (comfy/weight_adapter/base.py weight_decompose
# as of ComfyUI v0.3.77, when dora_scale.shape[0] is the weight's output size) compute W + (α/r)·up·down and
# multiply each row by dora_scale / ‖W_row‖, the row norm of the *base* weight W, not of M. So the file carries
# what those UIs need, dora_scale = m·‖W_row‖/‖M_row‖, shaped (out, 1, ...) like the weight: they rebuild m·M/‖M‖
# exactly. A loader with LyCORIS's semantics (LyCORIS itself; ComfyUI if its open PR 15458 lands) would scale each
# row by ‖W_row‖/‖M_row‖ more (on the world model's DoRA: 1.8 % on average, 30 % at most). AUTOMATIC1111
# (extensions-builtin/Lora network.py apply_weight_decompose), and ComfyUI before it checked the axis, read only
# input-axis scales (one per input column): no file can carry PEFT's per-row magnitude to them. What every UI
# adds exactly, whatever its DoRA formula, is the full diff W' − W (``full_diffs``).
NEEDS_BASE = (
    "{what} depends on the base model's weights; pass them (the stages do, and `posebooth export` loads the base "
    "model named in the stage's provenance.json)"
)
DORA_UI_NOTE = (
    "export: %s is a DoRA for ComfyUI and Forge (their output-axis DoRA as of ComfyUI v0.3.77: exact there); "
    "AUTOMATIC1111 reads only input-axis DoRA and would load it with wrong weights: `posebooth export --full-diff` "
    "writes a <name>_diff file (full weight diffs, large) that every UI loads exactly; or train train.adapter: lora"
)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·up·down in the weight's shape, (out, in) or (out, in, kh, kw) (a conv LoRA's up is (out, r, 1, 1)),
    in float64."""
    return (up.double().flatten(1) @ down.double().flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale


def dora_scale(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, magnitude: torch.Tensor, scale: float):
    """The output-axis ``dora_scale`` (out, 1, ...) that makes ComfyUI/Forge rebuild PEFT's DoRA weight
    m·M/‖M‖ per output row, M = W + scale·up·down (``scale`` = α/r): m·‖W‖/‖M‖ per row (see above). ``weight``
    is the base model's (out, in) or (out, in, kh, kw) weight; ``magnitude`` PEFT's ``lora_magnitude_vector``
    (out,) or, for a conv layer, (1, out, 1, 1)."""
    w = weight.detach().double()
    delta = lora_delta(down, up, 1.0)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1).norm(dim=1)

    m = magnitude.double().flatten()
    if m.shape[0] != w.shape[0]:
        raise ValueError(f"DoRA magnitude of {m.shape[0]} rows for a weight of {w.shape[0]}: not this base model's")
    s = m * rows(w) / rows(w + scale * delta)
    return s.reshape(w.shape[0], *[1] * (w.dim() - 1)).to(down.dtype)


def base_weights_of(comp) -> BaseWeights:
    """``BaseWeights`` read off loaded models (``comp``: ``models.Components``, or anything with ``unet``,
    ``text_encoder`` and ``text_encoder_2`` attributes): a module PEFT wraps gives its base layer's weight
    (adapters only wrap it; a fused adapter would change it)."""

    def weight(part: str, module: str) -> torch.Tensor:
        layer = getattr(comp, part).get_submodule(module)
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        return layer.weight.detach().float().cpu()

    return weight


def base_weights_from_provenance(stage1: Path) -> BaseWeights:
    """``BaseWeights`` of the base model stage 1 trained on (its provenance.json's ``common.model``), loaded on
    first use, on the CPU, through the only loading code (``models.load_components``)."""
    loaded: list[BaseWeights] = []

    def weight(part: str, module: str) -> torch.Tensor:
        if not loaded:
            from posebooth.models import load_components

            common = _stage1_params(stage1)["common"]
            loaded.append(
                base_weights_of(load_components(common["model"], model_config=common.get("model_config", "")))
            )
        return loaded[0](part, module)

    return weight


def saved_adapter_kind(folder: Path) -> str:
    """The kind (``adapter_kind``) of the adapter saved in ``folder`` (diffusers' LoRA file or PEFT's folders)."""
    _, config = read_adapter(folder)
    return adapter_kind(config["unet"] if "unet" in config else next(iter(config.values())))


def adapter_modules(state: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """A saved adapter's tensors grouped by (part, module): ``down``, ``up``, ``magnitude`` or LyCORIS's names."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, weight in state.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise ValueError(
                f"{key}: not a key the UI export converts (LoRA, LoHa or LoKr weights of the UNet or a text encoder; "
                "LoHa/LoKr with Tucker or effective-conv factors, hada_t1/lokr_t1, have no export)"
            )
        if m["magnitude"]:
            param = "magnitude"
        elif m["lycoris"]:
            param = m["lycoris"]
        else:
            param = "down" if (m["a"] or m["b"] or {"A": "down", "B": "up"}[m["c"]]) == "down" else "up"
        modules.setdefault((m["part"], m["module"]), {})[param] = weight
    return modules


def full_diffs(
    state: dict[str, torch.Tensor], config: dict[str, dict], unet_config: dict, xl: bool, base: BaseWeights | None
) -> dict[str, torch.Tensor]:
    """LyCORIS's "full" layout of a LoRA or DoRA: ``<module>.diff``, the change W' − W each module makes, in fp16.
    AUTOMATIC1111 (``network_full.py``: no ``alpha``, so scale 1) and ComfyUI (``lora.py``: a ``diff`` patch) add
    it to the weight times the strength: exact in both, whatever their DoRA formulas, the way to use a DoRA in
    AUTOMATIC1111. As large as the adapted layers themselves (SD 1.5's attention: about 190 MB). ``base`` (the base
    weights) is read for a DoRA only: a LoRA's diff is its own (α/r)·up·down."""
    out: dict[str, torch.Tensor] = {}
    for (part, module), w in adapter_modules(state).items():
        cfg = config.get(part, {})
        kind = adapter_kind(cfg)
        if kind not in ("lora", "dora"):
            raise ValueError(f"{part}: full diffs are written for LoRA and DoRA; a {kind} exports exactly as it is")
        alpha, rank = _alpha_and_rank(part, cfg)
        delta = lora_delta(w["down"], w["up"], alpha / rank)
        if kind == "dora":  # PEFT's merged weight m · M / ‖M‖ per output row, minus W
            if base is None:
                raise ValueError(NEEDS_BASE.format(what="a DoRA's full diff (W' − W)"))
            weight = base(part, module).double()
            merged = weight + delta
            scale = w["magnitude"].double().flatten() / merged.reshape(merged.shape[0], -1).norm(dim=1)
            delta = scale.reshape(-1, *[1] * (weight.dim() - 1)) * merged - weight
        out[f"{kohya_module_name(part, module, unet_config, xl)}.diff"] = delta.half()
    return out


def kohya_lora(
    state: dict[str, torch.Tensor],
    config: dict[str, dict],
    unet_config: dict,
    xl: bool,
    base: BaseWeights | None = None,
) -> dict:
    """A saved adapter's state dict in kohya's (LoRA) or LyCORIS's (DoRA, LoHa, LoKr) layout, each part
    converted on its own (``config``: per part, its saved adapter config, as ``read_adapter`` gives it).

    - LoRA (``unet.…lora.down.weight``, ``text_encoder.…lora_linear_layer.up.weight``, PEFT's ``lora_A``/``lora_B``):
      ``lora_down.weight``, ``lora_up.weight`` and the trained ``alpha`` (the UIs scale by alpha / rank).
    - DoRA: the LoRA keys plus ``dora_scale`` (``dora_scale``: needs ``base``, the base model's weights).
    - LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b`` and ``alpha``: the same
      tensors and scale (α / r) in PEFT (``tuners/loha/layer.py``) and in the UIs (ComfyUI
      ``weight_adapter/loha.py``, A1111 ``network_hada.py``).
    - LoKr: ``lokr_w1`` (or ``lokr_w1_a``/``_b``), ``lokr_w2`` (or ``lokr_w2_a``/``_b``) and ``alpha``. The UIs
      scale by α / r only when a factor is decomposed (ComfyUI ``weight_adapter/lokr.py``: 1 otherwise), PEFT
      always: with both factors full, PEFT's α / r goes into ``lokr_w2`` (and ``alpha`` is r, LyCORIS's
      value for "no scale").
    """
    out: dict[str, torch.Tensor] = {}
    for (part, module), w in adapter_modules(state).items():
        cfg = config.get(part, {})
        kind = adapter_kind(cfg)
        alpha, rank = _alpha_and_rank(part, cfg)
        name = kohya_module_name(part, module, unet_config, xl)
        if kind in ("lora", "dora"):
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = w["down"], w["up"]
        if kind == "dora":
            if base is None:
                raise ValueError(NEEDS_BASE.format(what="train.adapter: dora: the UI export's dora_scale"))
            out[f"{name}.dora_scale"] = dora_scale(base(part, module), w["down"], w["up"], w["magnitude"], alpha / rank)
        if kind == "loha":
            out |= {f"{name}.{k}": w[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        elif kind == "lokr":
            out |= {f"{name}.{k}": v for k, v in w.items()}
            if "lokr_w1" in w and "lokr_w2" in w:  # no factor decomposed: the UIs do not scale, so PEFT's α / r here
                out[f"{name}.lokr_w2"] = w["lokr_w2"] * (alpha / rank)
                alpha = float(rank)
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(state, config)`` of the adapter stage 1 (or stage 2's ``unet_lora/``) saved in ``folder``: diffusers'
    LoRA file (LoRA, DoRA), or PEFT's ``peft/<part>/`` folders (LoHa, LoKr; keys become ``<part>.<module>…``)."""
    from safetensors.torch import load_file

    from posebooth.lora import LORA_FILE, PEFT_CONFIG, PEFT_DIR, PEFT_WEIGHTS

    folder = Path(folder)
    if (folder / LORA_FILE).exists():
        return load_file(str(folder / LORA_FILE)), lora_config(folder / LORA_FILE)
    state, config = {}, {}
    for sub in sorted((folder / PEFT_DIR).glob("*")):
        if (sub / PEFT_CONFIG).exists():
            config[sub.name] = json.loads((sub / PEFT_CONFIG).read_text())
            weights = load_file(str(sub / PEFT_WEIGHTS))
            state |= {f"{sub.name}.{k.removeprefix('base_model.model.')}": v for k, v in weights.items()}
    if not config:
        raise FileNotFoundError(f"{folder}: neither {LORA_FILE} nor {PEFT_DIR}/; run train_stage1_appearance first")
    return state, config


def export_kohya(
    diffusers_file: Path,
    out_file: Path,
    unet_config: dict,
    subject: Subject,
    text_encoders_from: Path | None = None,
    base: BaseWeights | None = None,
    full_diff: bool = False,
) -> Path:
    """Write the saved adapter ``diffusers_file`` (diffusers' LoRA file, or a folder: that file or ``peft/``) in
    kohya's / LyCORIS's layout, which AUTOMATIC1111/Forge and ComfyUI read, with its metadata.
    ``text_encoders_from``: another one whose text-encoder parts replace this one's (stage 2 continues only
    the UNet LoRA of stage 1). ``base``: the base model's weights, which a DoRA's export needs. ``full_diff``: write
    ``full_diffs`` instead (a LoRA or DoRA)."""
    from safetensors.torch import load_file

    def read(path: Path):
        return read_adapter(path) if Path(path).is_dir() else (load_file(str(path)), lora_config(Path(path)))

    state, config = read(diffusers_file)
    if text_encoders_from is not None:
        te_state, te_config = read(text_encoders_from)
        state = {k: v for k, v in state.items() if k.startswith("unet.")}
        state |= {k: v for k, v in te_state.items() if not k.startswith("unet.")}
        config |= {p: c for p, c in te_config.items() if p != "unet"}
    cfg = config["unet"] if "unet" in config else next(iter(config.values()))
    kind = adapter_kind(cfg)
    if full_diff:
        alpha, rank = _alpha_and_rank("unet", cfg)
        diffs = full_diffs(state, config, unet_config, subject.xl, base)
        return save_safetensors(diffs, out_file, lora_metadata(subject, rank, alpha, out_file.stem, "full"))
    kohya = kohya_lora(state, config, unet_config, subject.xl, base)
    if kind == "lora":  # (as before DoRA, LoHa and LoKr: the same bytes for the same LoRA)
        rank = max(w.shape[0] for k, w in kohya.items() if k.endswith(".lora_down.weight"))
        alpha = cfg["lora_alpha"]
    else:
        alpha, rank = _alpha_and_rank("unet", cfg)
        written = {v.item() for k, v in kohya.items() if k.endswith(".alpha")}
        if len(written) == 1:  # LoKr with full factors writes alpha = r (its α / r is in lokr_w2): record that
            alpha = written.pop()
    return save_safetensors(kohya, out_file, lora_metadata(subject, rank, alpha, out_file.stem, kind))


# ---------------------------------------------------------------------------------------------------------
# Single-file checkpoints: SD 1.5 (full) and ControlNet


def ldm_checkpoint(
    unet: dict, vae: dict, text_encoder: dict, unet_config: dict, vae_config: dict, dtype=torch.float16
) -> dict:
    """An SD 1.5 pipeline's state dicts in the original single-file layout (``model.diffusion_model.``,
    ``first_stage_model.``, ``cond_stage_model.transformer.``), in ``dtype`` (fp16, as the UIs' checkpoints).
    The VAE's mid-block attention is 1×1 convolutions there, linear layers in diffusers."""
    out = {f"model.diffusion_model.{ldm_unet_key(k, unet_config)}": v for k, v in unet.items()}
    up = len(vae_config["up_block_types"])
    for k, v in vae.items():
        key = ldm_vae_key(k, up)
        if ".mid.attn_1." in key and key.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # (C, C) → (C, C, 1, 1)
        out[f"first_stage_model.{key}"] = v
    out |= {f"cond_stage_model.transformer.{k}": v for k, v in text_encoder.items() if "position_ids" not in k}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}


def export_checkpoint(pipeline_folder: Path, out_file: Path, subject: Subject) -> list[Path]:
    """The ``full`` method's diffusers pipeline as one fp16 SD 1.5 checkpoint (A1111/Forge ``models/Stable-
    diffusion``, ComfyUI ``models/checkpoints``, diffusers ``from_single_file``). A token added to the
    tokenizer (``train.new_token``) cannot live in a checkpoint, whose loaders build the stock 49408-row
    table: its rows go to ``<identifier>.safetensors``, an embedding, and the table is cut back."""
    from safetensors.torch import load_file

    if subject.xl:
        raise ValueError("the full-checkpoint export is for SD 1.5 (train.method full is SD 1.5 only)")
    parts = {p: load_file(str(pipeline_folder / p / _weights_file(pipeline_folder / p))) for p in PARTS}
    # transformers 5 saves CLIPTextModel's weights without its ``text_model.`` prefix; the checkpoint has it
    te = parts["text_encoder"]
    parts["text_encoder"] = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in te.items()}
    configs = {p: json.loads((pipeline_folder / p / "config.json").read_text()) for p in ("unet", "vae")}
    written = []
    table_key = "text_model.embeddings.token_embedding.weight"
    table = parts["text_encoder"][table_key]
    if len(table) > CLIP_VOCAB:
        parts["text_encoder"][table_key] = table[:CLIP_VOCAB]
        written.append(_save_embedding({"emb_params": table[CLIP_VOCAB:].float()}, out_file.parent, subject))
    ckpt = ldm_checkpoint(parts["unet"], parts["vae"], parts["text_encoder"], configs["unet"], configs["vae"])
    meta = modelspec(subject, "", out_file.stem, SGM)
    return [save_safetensors(ckpt, out_file, meta), *written]


PARTS = ("unet", "vae", "text_encoder")


def _weights_file(folder: Path) -> str:
    names = ("diffusion_pytorch_model.safetensors", "model.safetensors")
    for name in names:
        if (folder / name).exists():
            return name
    raise FileNotFoundError(f"{folder}: none of {names}")


def controlnet_checkpoint(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's state dict in the original layout (``control_model.input_blocks…``,
    ``zero_convs``, ``input_hint_block``, ``middle_block_out``), fp16."""
    return {f"control_model.{ldm_unet_key(k, config)}": v.half() for k, v in state.items()}


def export_controlnet(controlnet, out_file: Path, subject: Subject) -> Path:
    """A ``ControlNetModel`` (its LoRA, if it has one, fused into it first) as one fp16 file that
    sd-webui-controlnet, ComfyUI and ``ControlNetModel.from_single_file`` load."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = controlnet.state_dict()
    if any(isinstance(m, BaseTunerLayer) for m in controlnet.modules()):
        import copy

        fused = copy.deepcopy(controlnet).float()  # fused in fp32, so the LoRA's small update is not rounded away
        fused.fuse_lora(lora_scale=1.0)
        fused.unload_lora()
        state = fused.state_dict()
    meta = modelspec(subject, "controlnet", out_file.stem, SGM) | {"modelspec.preprocessor": "openpose"}
    return save_safetensors(controlnet_checkpoint(state, dict(controlnet.config)), out_file, meta)


# ---------------------------------------------------------------------------------------------------------
# Textual inversion


def _save_embedding(tensors: dict[str, torch.Tensor], folder: Path, subject: Subject) -> Path:
    meta = modelspec(subject, "textual-inversion", subject.identifier, SGM)
    return save_safetensors(tensors, folder / f"{subject.identifier}.safetensors", meta)


def export_embedding(learned_embeds: Path, folder: Path, subject: Subject) -> Path:
    """``learned_embeds.safetensors`` as ``<identifier>.safetensors``: the word that calls it in A1111 (and
    ``embedding:<identifier>`` in ComfyUI) is the file name. SD 1.5: one tensor ``emb_params`` (N, 768), the
    name A1111 saves; SDXL: ``clip_l`` (N, 768) and ``clip_g`` (N, 1280), the keys both UIs read."""
    from safetensors.torch import load_file

    state = load_file(str(learned_embeds))
    if set(state) != {"clip_l", "clip_g"}:
        if len(state) != 1:
            raise ValueError(f"{learned_embeds}: expected one embedding, found {sorted(state)}")
        state = {"emb_params": next(iter(state.values()))}
    return _save_embedding({k: v.float() for k, v in state.items()}, folder, subject)


# ---------------------------------------------------------------------------------------------------------
# Whole stages


def unet_config_of(stage1: Path) -> dict:
    """The UNet config of the model stage 1 trained: its own (``full``), else its base model's (a hub id in
    the cache, a folder, an embedded model or a checkpoint file with its ``common.model_config``; read offline)."""
    from posebooth.models import unet_config

    if (Path(stage1) / "unet" / "config.json").exists():
        return json.loads((Path(stage1) / "unet" / "config.json").read_text())
    common = _stage1_params(stage1)["common"]
    return unet_config(common["model"], common.get("model_config", ""))


def _stage1_params(stage1: Path) -> dict:
    path = Path(stage1) / "provenance.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run train_stage1_appearance first (dvc repro)")
    return json.loads(path.read_text())["params"]


def subject_of(stage1: Path) -> Subject:
    """The subject a stage-1 folder holds, from its provenance.json (the params that trained it)."""
    xl = unet_config_of(stage1).get("addition_embed_type") == "text_time"  # SDXL's added conditioning
    return Subject.from_params(_stage1_params(stage1), xl)


def write_all(stage1: Path, stage2: Path | None, out: Path, full_diff: bool = False) -> list[Path]:
    """Every UI export of the trained ``stage1`` (and ``stage2``, if given and trained) into ``out``: what
    ``posebooth export`` writes (``full_diff``: each LoRA or DoRA also as ``<name>_diff.safetensors``)."""
    stage1 = Path(stage1)
    subject, unet_config = subject_of(stage1), unet_config_of(stage1)
    base = base_weights_from_provenance(stage1)  # loaded only for a DoRA or full diffs
    written = write_stage1(stage1, out, subject, unet_config, base, full_diff)
    if stage2 is not None and (Path(stage2) / "provenance.json").exists():
        written += write_stage2(Path(stage2), stage1, out, subject, unet_config, base=base, full_diff=full_diff)
    return written


def _kohya_files(adapter: Path, out_file: Path, unet_config: dict, subject: Subject, te, base, full_diff: bool):
    """The kohya/LyCORIS file, and with ``full_diff`` beside it the ``full_diffs`` one (``<name>_diff``) of a LoRA
    or DoRA."""
    written = [export_kohya(adapter, out_file, unet_config, subject, te, base)]
    if full_diff and saved_adapter_kind(adapter) in ("lora", "dora"):
        diff_file = out_file.with_name(f"{out_file.stem}_diff.safetensors")
        written.append(export_kohya(adapter, diff_file, unet_config, subject, te, base, full_diff=True))
    return written


def write_stage1(
    stage1: Path, out: Path, subject: Subject, unet_config: dict, base: BaseWeights | None = None,
    full_diff: bool = False,
) -> list[Path]:  # fmt: skip
    """The UI exports of what stage 1 saved in ``stage1``: the kohya LoRA, the embedding, the checkpoint.
    (Custom Diffusion's weights have no UI format; only its embedding is exported.) ``base``: the base model's
    weights, for a DoRA (``BaseWeights``; by default loaded from stage 1's provenance.json). ``full_diff``: a LoRA
    or DoRA also as ``full_diffs`` (``<name>_diff.safetensors``)."""
    from posebooth.lora import has_adapter
    from posebooth.methods import TI_FILE

    stage1, out = Path(stage1), Path(out)
    written = []
    if has_adapter(stage1):  # LoRA, DoRA (pytorch_lora_weights.safetensors), LoHa, LoKr (peft/)
        path = out / f"{subject.stem}.safetensors"
        base = base or base_weights_from_provenance(stage1)
        written += _kohya_files(stage1, path, unet_config, subject, None, base, full_diff)
        if saved_adapter_kind(stage1) == "dora":
            log.warning(DORA_UI_NOTE, path.name)
    if (stage1 / TI_FILE).exists():
        written.append(export_embedding(stage1 / TI_FILE, out, subject))
    if (stage1 / "model_index.json").exists():
        written += export_checkpoint(stage1, out / f"{subject.stem}.safetensors", subject)
    for path in written:
        log.info("export: %s", path)
    return written


def write_stage2(
    stage2: Path, stage1: Path, out: Path, subject: Subject, unet_config: dict, controlnet=None,
    base: BaseWeights | None = None, full_diff: bool = False,
):  # fmt: skip
    """The UI exports of stage 2: the ControlNet as one file (``controlnet``: the trained model if at hand,
    else loaded from ``stage2``) and the continued UNet LoRA (with stage 1's text-encoder LoRA, as
    ``posebooth generate`` combines them; ``base`` and ``full_diff`` as for ``write_stage1``)."""
    from posebooth.lora import has_adapter

    stage2, stage1, out = Path(stage2), Path(stage1), Path(out)  # the stage passes its arguments' strings
    if controlnet is None:
        from posebooth.subject import load_stage2_controlnet

        controlnet = load_stage2_controlnet(stage2, "cpu", "fp32")
    written = [export_controlnet(controlnet, out / f"{subject.stem}_openpose_controlnet.safetensors", subject)]
    if has_adapter(stage2 / "unet_lora"):
        te = stage1 if has_adapter(stage1) else None
        out_file = out / f"{subject.stem}_pose.safetensors"
        base = base or base_weights_from_provenance(stage1)
        written += _kohya_files(stage2 / "unet_lora", out_file, unet_config, subject, te, base, full_diff)
        if saved_adapter_kind(stage2 / "unet_lora") == "dora":
            log.warning(DORA_UI_NOTE, out_file.name)
    for path in written:
        log.info("export: %s", path)
    return written
