"""LoRA adapters on the UNet: inject with PEFT, save in the diffusers format, load back.

Saved files are what stock diffusers pipelines read: ``pipe.load_lora_weights(folder)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"


def add_unet_lora(unet, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter into ``unet`` (its base weights stay frozen); return the trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        unet.add_adapter(config)
    except ValueError as err:
        raise ValueError(f"train.target_modules: {target_modules} do not match the UNet's layers ({err})") from err
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # trainable weights stay fp32 even when the model runs in half precision
        p.data = p.data.float()
    return params


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' DreamBooth LoRA scripts


def add_text_encoder_lora(
    text_encoder, rank: int, alpha: float, skip_last_layer: bool = False
) -> list[torch.nn.Parameter]:
    """A LoRA on the text encoder's attention projections (its own weights stay frozen). ``skip_last_layer``:
    none on the last transformer layer, for SDXL's first text encoder, whose penultimate hidden state is all
    SDXL reads (a LoRA there would never get a gradient, which DDP refuses)."""
    from peft import LoraConfig

    text_encoder.requires_grad_(False)
    layers = {}
    if skip_last_layer:
        layers = dict(
            layers_to_transform=list(range(text_encoder.config.num_hidden_layers - 1)), layers_pattern="layers"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS,
                        **layers)  # fmt: skip
    text_encoder.add_adapter(config)
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def _layers_and_metadata(model, adapter: str = "default") -> tuple[dict, dict]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter))
    # PEFT keeps target_modules as a set, whose order changes from process to process: sort it, so that
    # the same training gives the same file, byte for byte.
    config = model.peft_config[adapter].to_dict()
    return layers, {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_unet_lora(unet, folder: str | Path, text_encoder=None, adapter: str = "default", text_encoder_2=None,
                   xl: bool = False) -> Path:  # fmt: skip
    """Write the UNet's LoRA (and the text encoders', if given) as ``pytorch_lora_weights.safetensors``
    in diffusers' key layout with the adapter configs: what ``pipe.load_lora_weights(folder)`` reads
    (``xl``: an SDXL pipeline's, whose second text encoder's LoRA is ``text_encoder_2``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet_layers, unet_meta = _layers_and_metadata(unet, adapter)
    te = {}
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            te[f"{name}_lora_layers"], te[f"{name}_lora_adapter_metadata"] = _layers_and_metadata(model)
    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipeline.save_lora_weights(
        str(folder), unet_lora_layers=unet_layers, unet_lora_adapter_metadata=unet_meta, safe_serialization=True, **te
    )
    path = Path(folder) / LORA_FILE
    _rewrite_canonically(path)
    return path


def _rewrite_canonically(path: Path) -> None:
    """Re-save a LoRA file so that the same weights give the same bytes.

    safetensors writes the header's metadata in hash-map order, which changes from process to process
    when there is more than one entry, and DVC would then see a new file for the same weights. The file
    keeps one metadata entry, the adapter config that ``load_lora_weights`` reads (the ``format: pt``
    marker is informational).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k == "lora_adapter_metadata"}
        tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    save_file(tensors, str(path), metadata=metadata or None)


def load_unet_lora(unet, folder: str | Path, adapter_name: str = "identity") -> None:
    """Load a saved UNet LoRA into ``unet`` and freeze everything (stage 2 keeps the identity fixed)."""
    path = Path(folder) / LORA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run train_stage1_appearance first (dvc repro)")
    unet.load_lora_adapter(str(folder), prefix="unet", adapter_name=adapter_name, use_safetensors=True)
    unet.requires_grad_(False)


# A ControlNet LoRA: attention projections, and the layers that read the pose: the pose encoder's convs and
# the zero convolutions (zero-initialised from a UNet, so a LoRA on attention alone would never see a gradient).
CONTROLNET_TARGETS = (
    r".*(to_q|to_k|to_v|to_out\.0|controlnet_down_blocks\.\d+|controlnet_mid_block"
    r"|controlnet_cond_embedding\.(conv_in|conv_out|blocks\.\d+))$"
)


def add_controlnet_lora(controlnet, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """A LoRA on a ControlNet (its own weights frozen); returns the trainable parameters."""
    from peft import LoraConfig

    controlnet.requires_grad_(False)
    controlnet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=CONTROLNET_TARGETS)
    )
    params = [p for p in controlnet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def save_controlnet_lora(controlnet, folder: str | Path) -> Path:
    """``pytorch_lora_weights.safetensors`` that ``controlnet.load_lora_adapter(folder, prefix=None,
    use_safetensors=True)`` reads."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    controlnet.save_lora_adapter(str(folder), adapter_name="default", safe_serialization=True)
    path = Path(folder) / LORA_FILE
    _rewrite_canonically(path)
    return path
