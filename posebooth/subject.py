"""Loading what stage 1 learned, whichever method made it, into a stock diffusers pipeline.

What is in the folder says how to load it, as it would for anyone else: a diffusers pipeline folder
(``full``) is a base model of its own; ``pytorch_lora_weights.safetensors`` (LoRA, DoRA) goes through
``load_lora_weights``; ``peft/`` (LoHa, LoKr: no diffusers loader) through ``lora.load_peft_adapters``;
``learned_embeds.safetensors`` through ``load_textual_inversion``;
``pytorch_custom_diffusion_weights.safetensors`` through ``unet.load_attn_procs``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from posebooth.lora import LORA_FILE, PEFT_DIR, has_adapter, load_adapters, load_unet_lora
from posebooth.methods import CD_FILE, TI_FILE

log = logging.getLogger(__name__)
FILES = ("model_index.json", LORA_FILE, PEFT_DIR, CD_FILE, TI_FILE)


def base_model(stage1: str | Path, base: str) -> str:
    """The model to load before the subject: the stage-1 folder itself for ``full``, else ``base``."""
    return str(stage1) if (Path(stage1) / "model_index.json").exists() else base


def load_into(pipe, stage1: str | Path, adapter_name: str = "subject") -> bool:
    """Load the subject from ``stage1`` into ``pipe`` (its modules change in place); returns whether it
    brought a LoRA (or DoRA, LoHa, LoKr; named ``adapter_name``), which ``set_adapters`` can then scale."""
    folder = Path(stage1)
    if not any((folder / f).exists() for f in FILES):
        raise FileNotFoundError(f"{folder}: holds none of {list(FILES)}; run train_stage1_appearance first (dvc repro)")
    has_lora = has_adapter(folder)
    if has_lora:
        load_adapters(pipe, folder, adapter_name)
    if (folder / CD_FILE).exists():
        load_custom_diffusion(pipe, folder / CD_FILE)
    if (folder / TI_FILE).exists():
        load_learned_embeddings(pipe, folder / TI_FILE)
    return has_lora


def load_learned_embeddings(pipe, path: Path) -> None:
    """Textual inversion the stock way: SD 1.5's one-entry file as it is; SDXL's ``clip_l`` / ``clip_g``
    rows into the first and the second text encoder, under the token recorded in the file's metadata."""
    from safetensors import safe_open

    from posebooth.methods import XL_TI_KEYS

    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        token = (f.metadata() or {}).get("token")
    if set(state) != set(XL_TI_KEYS):
        pipe.load_textual_inversion(str(path.parent), weight_name=path.name, use_safetensors=True)
        return
    if not token:
        raise ValueError(f"{path}: SDXL embeddings without the 'token' metadata entry; train stage 1 again")
    for key, encoder, tokenizer in zip(XL_TI_KEYS, (pipe.text_encoder, pipe.text_encoder_2),
                                       (pipe.tokenizer, pipe.tokenizer_2), strict=True):  # fmt: skip
        pipe.load_textual_inversion(
            state[key], token=token, text_encoder=encoder, tokenizer=tokenizer, use_safetensors=True
        )  # (tensors read with safetensors above)


def load_custom_diffusion(pipe, path: Path) -> None:
    """``pipe.unet.load_attn_procs`` with two defects of diffusers 0.42 worked around (diffusers issue
    9320): called without the pipeline it silently installs nothing, and a safetensors file, which cannot
    hold the empty entries of the self-attention layers, leaves too few processors. The entries are added
    back (empty: those layers run unchanged) and the pipeline is passed."""
    from safetensors.torch import load_file

    state: dict = load_file(str(path))
    for name in pipe.unet.attn_processors:
        if not any(k.startswith(name + ".") for k in state):
            state[name] = {}
    pipe.unet.load_attn_procs(state, _pipeline=pipe)


def trained_pipelines(
    comp,
    stage1: str,
    stage2: str,
    scheduler: str,
    device: str,
    precision: str,
    cpu_offload: bool,
    subject_scale: float = 1.0,
    extra_loras: list[tuple[str, float]] = (),
    with_controlnet: bool = True,
):
    """``(posed, free)``: a ControlNet pipeline with the stage-2 ControlNet and a plain one, sharing the
    modules that carry the stage-1 subject (loaded the stock diffusers way, see ``subject.load_into``).
    With ``with_controlnet=False`` the stage-2 ControlNet is not loaded (``stage2`` need not exist) and
    ``posed`` is None; the plain pipeline is the same (stage 2's continued UNet LoRA included, if any).

    ``extra_loras`` are further LoRAs (a folder or a ``.safetensors`` file, for example a style) with their
    weights, active next to the subject's LoRA, which is scaled by ``subject_scale``.
    """
    from posebooth.models import check_controlnet_fits, sd_pipeline

    controlnet = load_stage2_controlnet(stage2, device, precision) if with_controlnet else None
    if controlnet is not None:
        check_controlnet_fits(controlnet, comp.unet, f"{stage2}")
    posed = sd_pipeline(comp, scheduler, controlnet)  # without the ControlNet: the plain pipeline itself
    has_lora = load_into(posed, stage1)  # into the modules both pipelines share
    if has_adapter(Path(stage2) / "unet_lora"):  # stage 2 went on training the UNet LoRA
        posed.unet.delete_adapters("subject")
        load_unet_lora(posed.unet, Path(stage2) / "unet_lora", adapter_name="subject")
    names, weights = (["subject"], [subject_scale]) if has_lora else ([], [])
    if not has_lora and subject_scale != 1.0:
        log.warning("sample.subject_lora_scale: %s ignored; the stage-1 method saved no LoRA", subject_scale)
    for i, (path, weight) in enumerate(extra_loras):
        p = Path(path)
        if p.is_file():
            posed.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=f"extra_{i}", use_safetensors=True)
        elif p.is_dir() and (p / PEFT_DIR).is_dir():  # a LoHa / LoKr saved by posebooth (train.adapter)
            load_adapters(posed, p, f"extra_{i}")
        elif p.is_dir():
            posed.load_lora_weights(str(p), adapter_name=f"extra_{i}", use_safetensors=True)
        else:
            raise FileNotFoundError(f"sample.extra_loras: {path} is neither a LoRA folder nor a .safetensors file")
        names.append(f"extra_{i}")
        weights.append(weight)
    if names:
        posed.set_adapters(names, weights)
    free = sd_pipeline(comp, scheduler) if controlnet is not None else posed
    if cpu_offload:  # small GPUs: each model visits the GPU only while it runs
        # Once, on the pipeline that holds every module: the hooks it puts on the shared text encoder,
        # UNet and VAE serve the pose-free pipeline too (a second call would re-chain them).
        posed.enable_model_cpu_offload()
    return (posed if controlnet is not None else None), free


def load_stage2_controlnet(stage2: str | Path, device: str, precision: str):
    """The stage-2 ControlNet: ``controlnet/`` (full fine-tune), or its base (``controlnet_base/`` or the
    reference in ``controlnet_base.json``) with ``controlnet_lora/`` loaded the stock way."""
    from posebooth.models import load_controlnet
    from posebooth.outputs import read_json

    stage2 = Path(stage2)
    if (stage2 / "controlnet").is_dir():
        return load_controlnet(str(stage2 / "controlnet"), device=device, precision=precision)
    if not (stage2 / "controlnet_lora" / LORA_FILE).exists():
        raise FileNotFoundError(
            f"{stage2}: neither controlnet/ nor controlnet_lora/; run train_stage2_pose (dvc repro)"
        )
    base = str(stage2 / "controlnet_base") if (stage2 / "controlnet_base").is_dir() else None
    base = base or read_json(stage2 / "controlnet_base.json")["controlnet"]
    controlnet = load_controlnet(base, device=device, precision=precision)
    controlnet.load_lora_adapter(str(stage2 / "controlnet_lora"), prefix=None, use_safetensors=True)
    return controlnet
