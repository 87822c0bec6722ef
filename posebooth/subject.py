"""Loading what stage 1 learned, whichever method made it, into a stock diffusers pipeline.

What is in the folder says how to load it, as it would for anyone else: a diffusers pipeline folder
(``full``) is a base model of its own; ``pytorch_lora_weights.safetensors`` goes through
``load_lora_weights``; ``learned_embeds.safetensors`` through ``load_textual_inversion``;
``pytorch_custom_diffusion_weights.safetensors`` through ``unet.load_attn_procs``.
"""

from __future__ import annotations

from pathlib import Path

from posebooth.lora import LORA_FILE
from posebooth.methods import CD_FILE, TI_FILE

FILES = ("model_index.json", LORA_FILE, CD_FILE, TI_FILE)


def base_model(stage1: str | Path, base: str) -> str:
    """The model to load before the subject: the stage-1 folder itself for ``full``, else ``base``."""
    return str(stage1) if (Path(stage1) / "model_index.json").exists() else base


def load_into(pipe, stage1: str | Path, adapter_name: str = "subject") -> bool:
    """Load the subject from ``stage1`` into ``pipe`` (its modules change in place); returns whether it
    brought a LoRA (named ``adapter_name``), which ``set_adapters`` can then scale."""
    folder = Path(stage1)
    if not any((folder / f).exists() for f in FILES):
        raise FileNotFoundError(f"{folder}: holds none of {list(FILES)}; run train_stage1_appearance first (dvc repro)")
    has_lora = (folder / LORA_FILE).exists()
    if has_lora:
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
    if (folder / CD_FILE).exists():
        load_custom_diffusion(pipe, folder / CD_FILE)
    if (folder / TI_FILE).exists():
        pipe.load_textual_inversion(str(folder), weight_name=TI_FILE)
    return has_lora


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
