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


def save_unet_lora(unet, folder: str | Path) -> Path:
    """Write the UNet's LoRA as ``pytorch_lora_weights.safetensors`` in diffusers' key layout, with its config."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return Path(folder) / LORA_FILE


def load_unet_lora(unet, folder: str | Path, adapter_name: str = "identity") -> None:
    """Load a saved UNet LoRA into ``unet`` and freeze everything (stage 2 keeps the identity fixed)."""
    path = Path(folder) / LORA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run train_stage1_appearance first (dvc repro)")
    unet.load_lora_adapter(str(folder), prefix="unet", adapter_name=adapter_name, use_safetensors=True)
    unet.requires_grad_(False)
