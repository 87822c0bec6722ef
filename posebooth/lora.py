"""Adapters on the UNet and the text encoders (``train.adapter``): inject with PEFT, save, load back.

- ``lora`` and ``dora`` (LoRA with PEFT's weight decomposition, Liu et al. 2024) are saved in diffusers' format,
  ``pytorch_lora_weights.safetensors``, what stock diffusers pipelines read: ``pipe.load_lora_weights(folder)``.
- ``loha`` (LoRA with Hadamard product) and ``lokr`` (LoRA with Kronecker product), PEFT's LyCORIS ports, have no
  diffusers pipeline loader: each component's adapter is saved as PEFT saves one, ``peft/<component>/`` with
  ``adapter_config.json`` and ``adapter_model.safetensors`` (``PeftModel.from_pretrained(unet, folder)`` reads it),
  and ``load_peft_adapters`` loads them into a pipeline's modules. ``load_adapters`` loads either layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_DIR = "peft"  # loha / lokr: peft/<component>/{adapter_config.json, adapter_model.safetensors}
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
ADAPTERS = ("lora", "dora", "loha", "lokr")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def adapter_config(adapter: str, rank: int, alpha: float, target_modules, **layers):
    """PEFT's config of ``train.adapter`` (rank ``r``, ``alpha``: a scale of alpha / r on each update).

    lora: ΔW = (α/r)·B·A; dora: (W + ΔW) with each output row rescaled to a learned magnitude; loha:
    ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b); lokr: ΔW = (α/r)·W1 ⊗ W2 (PEFT's ``tuners/{lora,loha,lokr}/layer.py``)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if adapter in ("lora", "dora"):  # lora: the config of before train.adapter, so the same trained weights
        dora = {"use_dora": True} if adapter == "dora" else {}
        return LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets, **dora, **layers
        )
    if adapter == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, **layers)
    if adapter == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, **layers)
    raise ValueError(f"train.adapter: {adapter!r} is not one of {', '.join(ADAPTERS)}")


def adapter_kind(config) -> str:
    """``lora``, ``dora``, ``loha`` or ``lokr``: the kind of a PEFT adapter config."""
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora":
        return "dora" if getattr(config, "use_dora", False) else "lora"
    if kind in ("loha", "lokr"):
        return kind
    raise ValueError(f"{kind}: not an adapter posebooth trains ({', '.join(ADAPTERS)})")


def add_unet_lora(
    unet, rank: int, alpha: float, target_modules: list[str], adapter: str = "lora"
) -> list[torch.nn.Parameter]:
    """Inject a ``adapter`` (train.adapter) into ``unet`` (its base weights stay frozen); return the trainable
    parameters."""
    unet.requires_grad_(False)
    config = adapter_config(adapter, rank, alpha, target_modules)
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
    text_encoder, rank: int, alpha: float, skip_last_layer: bool = False, adapter: str = "lora"
) -> list[torch.nn.Parameter]:
    """A LoRA (or another ``adapter``) on the text encoder's attention projections (its own weights stay frozen).
    ``skip_last_layer``: none on the last transformer layer, for SDXL's first text encoder, whose penultimate
    hidden state is all SDXL reads (a LoRA there would never get a gradient, which DDP refuses)."""
    text_encoder.requires_grad_(False)
    layers = {}
    if skip_last_layer:
        layers = dict(
            layers_to_transform=list(range(text_encoder.config.num_hidden_layers - 1)), layers_pattern="layers"
        )
    text_encoder.add_adapter(adapter_config(adapter, rank, alpha, TEXT_ENCODER_TARGETS, **layers))
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
    (``xl``: an SDXL pipeline's, whose second text encoder's LoRA is ``text_encoder_2``). DoRA too (its
    ``lora_magnitude_vector`` entries); a LoHa or LoKr goes to ``peft/`` instead (``save_peft_adapters``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if adapter_kind(unet.peft_config[adapter]) in ("loha", "lokr"):
        models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        return save_peft_adapters(folder, models, adapter)
    unet_layers, unet_meta = _layers_and_metadata(unet, adapter)
    te = {}
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            layers, te[f"{name}_lora_adapter_metadata"] = _layers_and_metadata(model)
            # DoRA: a text encoder's magnitudes as ``….lora_magnitude_vector.weight``. Under the bare name (PEFT's,
            # which the UNet loads), diffusers 0.42's load_lora_weights hands them to transformers 5, whose
            # adapter loader puts the adapter name after it and drops them as unexpected: the text encoder would
            # silently keep its initial magnitudes.
            te[f"{name}_lora_layers"] = {
                (f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in layers.items()
            }
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


def save_peft_adapters(folder: str | Path, models: dict, adapter: str = "default") -> Path:
    """Each model's adapter (``models``: component name → model or None) as PEFT's ``save_pretrained`` writes
    one, in ``folder/peft/<component>/``: ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.<weight>``, without the adapter name). Returns ``folder/peft``."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = Path(folder) / PEFT_DIR
    for name, model in models.items():
        if model is None:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(model, adapter_name=adapter)
        state = {f"base_model.model.{k}": v.detach().float().contiguous() for k, v in sorted(state.items())}
        save_file(state, str(root / name / PEFT_WEIGHTS), metadata={"format": "pt"})  # one entry: same bytes
        # (target_modules is a set, whose order changes from process to process: sorted, for the same bytes)
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config[adapter].to_dict().items()}
        (root / name / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return root


def has_adapter(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved adapter in either layout (diffusers' LoRA file or ``peft/``)."""
    return (Path(folder) / LORA_FILE).exists() or (Path(folder) / PEFT_DIR).is_dir()


def load_peft_adapters(models: dict, folder: str | Path, adapter_name: str, parts=None) -> None:
    """Load ``folder/peft/<component>/`` (``save_peft_adapters``) into ``models[component]`` as adapter
    ``adapter_name``, frozen; ``parts``: only these components (default: every one saved). A saved weight
    that finds no place, or an adapter weight left without one, is an error."""
    from peft import get_peft_config
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    root = Path(folder) / PEFT_DIR
    saved = sorted(p.name for p in root.glob("*") if (p / PEFT_CONFIG).exists()) if root.is_dir() else []
    if not saved:
        raise FileNotFoundError(f"{root}: no adapter; run train_stage1_appearance first (dvc repro)")
    for name in [n for n in saved if parts is None or n in parts]:
        model = models.get(name)
        if model is None:
            raise ValueError(f"{root / name}: an adapter for {name}, which the pipeline it is loaded into has not")
        # the config is JSON, read as such (no from_pretrained: nothing here may fetch or unpickle)
        config = get_peft_config(json.loads((root / name / PEFT_CONFIG).read_text()))
        model.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, load_file(str(root / name / PEFT_WEIGHTS)), adapter_name)
        missing = [k for k in result.missing_keys if f".{adapter_name}" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"{root / name}: does not fit {type(model).__name__} (unexpected {result.unexpected_keys[:3]}, "
                f"missing {missing[:3]}); was it trained on another base model?"
            )
        model.requires_grad_(False)


def load_adapters(pipe, folder: str | Path, adapter_name: str) -> None:
    """Load the adapter saved in ``folder`` into ``pipe``'s UNet and text encoders as ``adapter_name``: the
    stock ``pipe.load_lora_weights`` for LoRA and DoRA, ``load_peft_adapters`` for LoHa and LoKr."""
    if (Path(folder) / LORA_FILE).exists():
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name, use_safetensors=True)
    else:
        load_peft_adapters({n: getattr(pipe, n, None) for n in COMPONENTS}, folder, adapter_name)


def load_unet_lora(unet, folder: str | Path, adapter_name: str = "identity") -> None:
    """Load a saved UNet LoRA (or DoRA, LoHa, LoKr) into ``unet`` and freeze everything (stage 2 keeps the
    identity fixed)."""
    path = Path(folder) / LORA_FILE
    if (Path(folder) / PEFT_DIR).is_dir() and not path.exists():
        load_peft_adapters({"unet": unet}, folder, adapter_name, parts=("unet",))
        return
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run train_stage1_appearance first (dvc repro)")
    unet.load_lora_adapter(str(folder), prefix="unet", adapter_name=adapter_name, use_safetensors=True)
    unet.requires_grad_(False)


def adapter_parameters(model, adapter_name: str) -> list[torch.nn.Parameter]:
    """The weights of adapter ``adapter_name`` in ``model`` (any kind: PEFT names them ``….<adapter_name>``
    or ``….<adapter_name>.weight``)."""
    return [p for n, p in model.named_parameters() if f".{adapter_name}." in f"{n}."]


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
