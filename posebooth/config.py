"""Strict, typed, frozen configuration loaded from ``params.yaml``.

Every stage names the sections it reads; each section maps onto one frozen dataclass below. An unknown
key, a missing key, a wrong type or an out-of-range value raises ``ConfigError`` naming the key and what
is allowed, before any heavy work. ``params.yaml`` is the single source of values: no defaults here.
"""

from __future__ import annotations

import dataclasses
import re
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A params.yaml problem; the message names the key and what is allowed."""


def _rng(lo=None, hi=None, lo_open=False, doc=""):
    """Field metadata: an allowed numeric range, open or closed at the low end."""
    return field(metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc})


def _positive():
    return _rng(0, lo_open=True)


def _nonneg():
    return _rng(0)


def _prob():
    return _rng(0.0, 1.0)


METHODS = ("lora", "full", "custom_diffusion", "textual_inversion", "momentum_ti")
ADAPTERS = ("lora", "dora", "loha", "lokr")  # train.adapter: PEFT adapters of method lora (posebooth/lora.py)
SCHEDULERS = ("ddim", "ddpm", "pndm", "euler", "euler_a", "dpm++")
OPTIMIZERS = ("adamw", "adamw_8bit", "prodigy", "adafactor")
TRACKERS = ("tensorboard", "wandb")
LATENT_DOWNSAMPLING = 8  # pixels per latent cell: the VAE of SD 1.5, SDXL and the embedded models


@dataclass(frozen=True)
class Common:
    """Values several stages share."""

    model: str  # "embedded:tiny-sd15", "embedded:tiny-sdxl", a hub id, a local diffusers folder, or a checkpoint file
    model_config: str  # model is a file: "" = the shipped SD 1.5 / SDXL configs its keys choose, or a diffusers folder
    vae: str  # "" (the model's own), or a VAE to use instead: hub id or folder, e.g. madebyollin/sdxl-vae-fp16-fix
    resolution: int = _rng(16, 4096)
    identifier: str
    class_noun: str
    instance_prompt: str  # template with {identifier} and {class_noun}
    class_prompt: str  # template with {class_noun}
    seed: int = _nonneg()
    device: Literal["cpu", "cuda", "mps"]
    precision: Literal["fp32", "fp16", "bf16"]  # of the frozen weights and the forward pass; trained weights stay fp32
    deterministic: bool  # GPU: deterministic kernels only (slower); CPU runs are bit-identical either way
    train_launcher: str  # what runs the training stages (dvc.yaml's cmd): python, or accelerate launch [options]
    monitor_system: bool  # training stages: dvclive's system figures beside the curves (they vary by run)
    trackers: list[Literal[TRACKERS]]  # training stages: accelerate's trackers beside dvclive, offline by default


@dataclass(frozen=True)
class PrepareImages:
    input_dir: str
    min_images: int = _rng(1)
    min_source_size: int = _rng(1)
    crop: Literal["centre", "face", "pad"]  # face: square centred on the largest face (centre if none)
    pad_color: list[int]  # RGB of the padding with crop: pad
    buckets: bool  # aspect-ratio buckets of area common.resolution² instead of squares (posebooth/buckets.py)
    bucket_step: int = _rng(8)  # buckets' sides are multiples of this (of the VAE's 8x downsampling)
    bucket_max_aspect: float = _rng(1.0)  # longest bucket side / shortest


@dataclass(frozen=True)
class GenerateClassPriors:
    source: Literal["generate", "folder"]  # folder: use the user's class photos in class_dir instead
    class_dir: str
    num_class_images: int = _nonneg()
    batch_size: int = _rng(1)
    steps: int = _rng(1)
    guidance_scale: float = _nonneg()
    scheduler: Literal[SCHEDULERS]
    negative_prompt: str
    pose_paired: bool  # generate through `controlnet` from the instance poses: (class image, pose) pairs
    controlnet: str  # the base OpenPose ControlNet for pose_paired: hub id, local folder or embedded


@dataclass(frozen=True)
class ExtractPoses:
    detector: Literal["sidecar", "openpose", "dwpose", "world"]  # world: the world's pose detector (world_weights)
    world_weights: str  # detector world: embedded:world-pose or a folder made by `posebooth world pretrain`
    openpose_weights: str  # hub id or local folder with body_pose_model.pth (detector: openpose)
    dwpose_mode: Literal["performance", "balanced", "lightweight"]  # rtmlib's model sizes (detector: dwpose)
    dwpose_det: str  # local .onnx person detector, or "" for the mode's (downloaded once)
    dwpose_pose: str  # local .onnx whole-body model, or "" for the mode's
    hands: bool  # also hand keypoints (openpose, dwpose), drawn in the pose maps
    face: bool  # also face keypoints (openpose, dwpose)
    min_keypoints: int = _rng(1, 1000)  # custom skeletons may have more than OpenPose's 18
    render_size: int = _rng(64, 4096)


@dataclass(frozen=True)
class Optimisation:
    """Knobs both training stages share (each stage has its own values)."""

    steps: int = _rng(1)  # optimizer steps
    lr: float = _positive()
    batch_size: int = _rng(1)
    prior_loss_weight: float = _nonneg()  # λ of the class prior term; 0 trains without it
    weight_decay: float = _nonneg()
    max_grad_norm: float = _positive()
    optimizer: Literal[OPTIMIZERS]  # adamw_8bit: bitsandbytes; prodigy: prodigyopt, lr 1.0; adafactor: transformers
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"]
    lr_warmup_steps: int = _nonneg()
    gradient_accumulation_steps: int = _rng(1)
    gradient_checkpointing: bool
    snr_gamma: float = _nonneg()  # min-SNR-γ loss weighting; 0 = off (5.0 is the paper's choice)
    noise_offset: float = _nonneg()  # offset noise; 0 = off
    checkpoint_every: int = _nonneg()  # optimizer steps between resumable checkpoints; 0 = none
    vae_batch_size: int = _rng(1)  # images per VAE encode call before training (photos, class images); lower on OOM
    ema_decay: float = _rng(0.0, 1.0)  # cap of the EMA's decay (training.make_ema); 0 = no EMA, < 1


@dataclass(frozen=True)
class Train(Optimisation):
    """Stage 1: learn the subject's appearance (DreamBooth and its variants) with prior preservation."""

    method: Literal[METHODS]  # what learns; see posebooth/methods.py
    train_text_encoder: bool  # lora: a text-encoder LoRA too; full: fine-tune the text encoder too
    text_encoder_lr: float = _positive()  # learning rate of the text encoder's weights (lora, full)
    train_token_embedding: bool  # custom_diffusion: learn the identifier's embedding row too
    new_token: bool  # add the identifier to the tokenizer as a brand-new token (row starts as the class word's)
    ti_steps: int = _rng(1)  # momentum_ti: steps of the momentum textual inversion after the DreamBooth steps
    ti_lr: float = _positive()  # momentum_ti: learning rate of θ (the seed project: 8e-4 x batch size)
    momentum_gamma: float = _rng(0.0, 1.0, lo_open=True)  # momentum_ti: γ in e0 + γ(θ − e0)
    face_loss_weight: float = _nonneg()  # extra loss weight inside the detected face box; 0 = off
    random_crops: int = _nonneg()  # random crops cached per photo (zoom augmentation); 0 = off
    random_crop_scale: float = _rng(0.1, 1.0)  # smallest crop side, as a fraction of the image side
    adapter: Literal[ADAPTERS]  # lora, dora, loha or lokr (method lora, momentum_ti's DreamBooth phase)
    rank: int = _rng(1)
    alpha: float = _positive()
    target_modules: list[str]
    flip_prob: float = _prob()  # horizontal flips of the instance images (latents cached per variant)
    export_kohya: bool  # also write exports/ for AUTOMATIC1111/Forge and ComfyUI (posebooth/exports.py)
    class_word_in_prompt: bool  # false: train on "a photo of sks" (prompt regularisation)
    prompt_templates: list[
        str
    ]  # random training prompts ({identifier} {class_noun} or {subject}); [] = instance_prompt
    descriptive_words: list[str]  # appended to a training prompt with descriptive_prob
    descriptive_prob: float = _prob()
    caption_template: str  # a photo's prompt when it has a caption (photo.txt): {prompt} and {caption}, see prompts.py
    caption_dropout: float = _prob()  # probability a captioned photo trains on the bare instance prompt
    validation_every: int = _nonneg()  # optimizer steps between validation images; 0 = none
    validation_prompts: list[str]  # templates with {identifier} and {class_noun}
    validation_steps: int = _rng(1)  # sampling steps of a validation image


@dataclass(frozen=True)
class TrainPose(Optimisation):
    """Stage 2: the OpenPose ControlNet on the subject's (image, pose map) pairs, identity frozen."""

    controlnet: str  # "from_unet", "embedded:tiny-sd15-openpose", a hub id or a local folder
    mode: Literal["full", "lora"]  # fine-tune the whole ControlNet, or a LoRA on it
    rank: int = _rng(1)  # mode lora
    alpha: float = _positive()
    train_unet_lora: bool  # also go on training the stage-1 UNet LoRA (MagicPose keeps it frozen)
    unet_lr: float = _positive()  # its learning rate
    empty_prompt_prob: float = _prob()
    export: bool  # also write exports/ for AUTOMATIC1111/Forge and ComfyUI (posebooth/exports.py)


@dataclass(frozen=True)
class Sample:
    prompts: list[str]  # templates with {identifier} and {class_noun}: the evaluation prompt set
    pose_prompts: list[str]  # sampled in every target pose; [] = prompts
    poses: list[str]  # keypoint JSON files of target poses
    seeds: list[int]
    batch_size: int = _rng(1)  # images per pipeline call, across prompts and seeds
    steps: int = _rng(1)
    guidance_scale: float = _nonneg()
    conditioning_scale: float = _nonneg()
    control_guidance_start: float = _prob()  # the ControlNet steers from this fraction of the steps ...
    control_guidance_end: float = _prob()  # ... to this one
    scheduler: Literal[SCHEDULERS]
    negative_prompt: str
    pose_free: bool
    prior_images: bool  # also the class prompt (common.class_prompt) with every seed: PRES in evaluate
    baselines: bool  # also the base model (no subject), and the posed prompts through train_pose.controlnet
    cpu_offload: bool  # accelerate's model CPU offload for small GPUs (cuda only)
    subject_lora_scale: float = _nonneg()  # strength of the subject's LoRA
    extra_loras: list[str]  # further LoRAs (in data/loras/), e.g. a style, used next to the subject's
    extra_lora_weights: list[float]  # one weight per extra LoRA


@dataclass(frozen=True)
class Evaluate:
    clip_model: str  # "embedded:tiny-clip" (stand-in) or e.g. "openai/clip-vit-base-patch32"
    dino_model: str  # "embedded:tiny-dino" (stand-in) or "facebook/dino-vits16"
    lpips_net: Literal["alex", "vgg", "squeeze", "random-alex"]
    fid_model: Literal["inception-v3", "embedded:tiny-inception", "none"]  # FID/KID feature extractor
    face_identity: Literal["auto", "on", "off"]  # auto: when common.class_noun is a person word
    face_weights: str  # FaceNet (VGGFace2) weights file, or "" for facenet-pytorch's release file
    inception_weights: str  # a local .safetensors/.pth for inception-v3, or "" for torch-fidelity's release file


SECTIONS: dict[str, type] = {
    "common": Common,
    "prepare_images": PrepareImages,
    "generate_class_priors": GenerateClassPriors,
    "extract_poses": ExtractPoses,
    "train": Train,
    "train_pose": TrainPose,
    "sample": Sample,
    "evaluate": Evaluate,
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2), not as the string PyYAML makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict:
    """Parse a params file; the error names the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the repository root, where params.yaml lives")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _check_type(key: str, value, tp):
    """Return ``value`` if it matches annotation ``tp`` (ints are accepted as floats), else raise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_tp.__name__}, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_range(key: str, value, meta) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        raise ConfigError(f"{key}: {value!r} is out of range; it must be {bound}" + (f" and <= {hi}" if hi else ""))
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is out of range; it must be <= {hi}")


def build_section(name: str, raw) -> object:
    """Validate one section's mapping against its dataclass and return the frozen instance."""
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key; allowed keys are {sorted(fields)}")
    missing = [k for k in fields if k not in raw]
    if missing:
        raise ConfigError(f"{name}.{missing[0]}: missing; params.yaml must set every key of '{name}'")
    values = {}
    for key, f in fields.items():
        full = f"{name}.{key}"
        value = _check_type(full, raw[key], hints[key])
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(full, value, f.metadata)
        values[key] = value
    return cls(**values)


@dataclass(frozen=True)
class Config:
    """The sections a stage asked for; the others are ``None``."""

    common: Common | None = None
    prepare_images: PrepareImages | None = None
    generate_class_priors: GenerateClassPriors | None = None
    extract_poses: ExtractPoses | None = None
    train: Train | None = None
    train_pose: TrainPose | None = None
    sample: Sample | None = None
    evaluate: Evaluate | None = None

    def as_dict(self) -> dict:
        """The loaded sections as plain data, for saving next to a model."""
        return {k: dataclasses.asdict(v) for k, v in vars(self).items() if v is not None}


def load(sections: typing.Iterable[str], path: str | Path = "params.yaml") -> Config:
    """Load and validate exactly ``sections`` of ``path``; cross-field checks follow."""
    data = read_yaml(path)
    loaded = {}
    for name in sections:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section {name!r}; sections are {sorted(SECTIONS)}")
        if name not in data:
            raise ConfigError(f"{path}: section '{name}' is missing")
        loaded[name] = build_section(name, data[name])
    cfg = Config(**loaded)
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    c = cfg.common
    if c is not None:
        if c.precision == "fp16" and c.device == "cpu":
            raise ConfigError(
                "common.precision: fp16 is not supported on cpu (accelerate silently turns it off there); "
                "use bf16 or fp32 on cpu, fp16 on cuda"
            )
        if not re.fullmatch(r"\S+", c.identifier):
            raise ConfigError(f"common.identifier: {c.identifier!r} must be one word without spaces, e.g. 'sks'")
        if "{identifier}" not in c.instance_prompt:
            raise ConfigError(
                "common.instance_prompt: must contain '{identifier}', e.g. 'a photo of {identifier} {class_noun}'"
            )
        if "{identifier}" in c.class_prompt:
            raise ConfigError(
                "common.class_prompt: must not contain '{identifier}': class images show the generic class"
            )
        _check_template("common.instance_prompt", c.instance_prompt)
        _check_template("common.class_prompt", c.class_prompt)
        _check_model_file(c.model, c.model_config)
        if len(set(c.trackers)) < len(c.trackers):
            raise ConfigError(f"common.trackers: {c.trackers} names a tracker twice; list each once")
    if cfg.prepare_images is not None:
        color = cfg.prepare_images.pad_color
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise ConfigError(f"prepare_images.pad_color: {color!r} must be three integers in [0, 255] (R, G, B)")
        step = cfg.prepare_images.bucket_step
        if cfg.prepare_images.buckets and step % LATENT_DOWNSAMPLING:  # (unused without buckets)
            raise ConfigError(
                f"prepare_images.bucket_step: {step} must be a multiple of {LATENT_DOWNSAMPLING} (the VAE's "
                "downsampling in SD 1.5 and SDXL: a bucket's sides must map to whole latent cells); 64 is usual"
            )
        if c is not None and cfg.prepare_images.buckets and step > c.resolution:
            raise ConfigError(
                f"prepare_images.bucket_step: {step} is above common.resolution ({c.resolution}): no bucket fits"
            )
    if cfg.sample is not None and cfg.common is not None and cfg.sample.cpu_offload and cfg.common.device != "cuda":
        raise ConfigError("sample.cpu_offload: needs common.device: cuda (it moves models between GPU and CPU)")
    if cfg.train is not None:
        for i, p in enumerate(cfg.train.validation_prompts):
            _check_template(f"train.validation_prompts[{i}]", p)
        for i, p in enumerate(cfg.train.prompt_templates):
            try:
                p.format(identifier="x", class_noun="y", subject="x y")
            except (KeyError, IndexError, ValueError) as err:
                raise ConfigError(
                    f"train.prompt_templates[{i}]: {p!r} may use {{identifier}}, {{class_noun}}, {{subject}} ({err})"
                ) from err
        _check_caption_template(cfg.train.caption_template)
    if cfg.train is not None:
        _check_method(cfg.train)
    if cfg.common is not None and not re.fullmatch(r"(python|accelerate launch|torchrun)( [-\w=.:/]+)*",
                                                   cfg.common.train_launcher):  # fmt: skip
        raise ConfigError(
            f"common.train_launcher: {cfg.common.train_launcher!r}; use python, or accelerate launch (after "
            "`accelerate config`) or torchrun, optionally followed by their options (letters, digits, - _ = . : /)"
        )
    if cfg.sample is not None:
        if len(cfg.sample.extra_loras) != len(cfg.sample.extra_lora_weights):
            raise ConfigError(
                f"sample.extra_lora_weights: {len(cfg.sample.extra_lora_weights)} weight(s) for "
                f"{len(cfg.sample.extra_loras)} LoRA(s) in sample.extra_loras; give one weight per LoRA"
            )
        for i, p in enumerate(cfg.sample.prompts):
            _check_template(f"sample.prompts[{i}]", p)
        for i, p in enumerate(cfg.sample.pose_prompts):
            _check_template(f"sample.pose_prompts[{i}]", p)
        if cfg.sample.control_guidance_start >= cfg.sample.control_guidance_end:
            raise ConfigError(
                f"sample.control_guidance_start: {cfg.sample.control_guidance_start} must be below "
                f"sample.control_guidance_end ({cfg.sample.control_guidance_end})"
            )
        if not cfg.sample.prompts or not cfg.sample.seeds:
            raise ConfigError("sample.prompts and sample.seeds: each needs at least one entry")
    for name in ("train", "train_pose"):
        t = getattr(cfg, name)
        if t is not None and t.lr_warmup_steps > t.steps:
            raise ConfigError(f"{name}.lr_warmup_steps: {t.lr_warmup_steps} is more than {name}.steps ({t.steps})")
        if t is not None and t.ema_decay >= 1:
            raise ConfigError(f"{name}.ema_decay: {t.ema_decay} would never move the average; use 0 (off) or < 1")
    if cfg.train is not None and cfg.generate_class_priors is not None:
        if cfg.train.prior_loss_weight > 0 and cfg.generate_class_priors.num_class_images == 0:
            raise ConfigError(
                "train.prior_loss_weight > 0 needs class images: set generate_class_priors.num_class_images >= 1 "
                "or train.prior_loss_weight: 0"
            )


# Suffixes of a single-file common.model (posebooth/single_file.py reads them; tests/test_single_file.py checks)
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _check_model_file(model: str, model_config: str) -> None:
    """common.model_config only applies to a single-file common.model (what the file holds is checked when it
    is loaded: posebooth/single_file.py)."""
    if model_config and Path(model).suffix.lower() not in MODEL_FILE_SUFFIXES:
        raise ConfigError(
            f"common.model_config: {model_config!r} is for a single-file common.model (.safetensors); "
            f'{model!r} brings its own configs: set common.model_config: ""'
        )


def _check_method(t: Train) -> None:
    """Options that only mean something for some methods must not be set for others (silently ignored
    options are how a run ends up training something else than its author thought)."""
    if t.train_text_encoder and t.method not in ("lora", "full"):
        raise ConfigError(f"train.train_text_encoder: true is for method lora or full, not {t.method}")
    if t.adapter != "lora" and t.method not in ("lora", "momentum_ti"):
        raise ConfigError(
            f"train.adapter: {t.adapter} is for method lora or momentum_ti (their LoRA), not {t.method}; "
            "set train.adapter: lora"
        )
    if t.train_token_embedding and t.method != "custom_diffusion":
        raise ConfigError(
            f"train.train_token_embedding: true is for method custom_diffusion, not {t.method} "
            "(textual_inversion and momentum_ti always learn the identifier's embedding)"
        )
    learns_row = (
        t.method == "textual_inversion"
        or (t.method == "custom_diffusion" and t.train_token_embedding)
        or (t.method == "full" and t.train_text_encoder)
    )
    if t.new_token and not learns_row:
        raise ConfigError(
            f"train.new_token: a brand-new token needs a method that learns its embedding (textual_inversion, "
            f"custom_diffusion with train_token_embedding, full with train_text_encoder); method is {t.method}"
        )


def _check_caption_template(template: str) -> None:
    """The caption template must put in the caption and the subject (the instance prompt or the identifier),
    or a captioned photo would train without its identifier."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ConfigError(f"train.caption_template: {template!r} is not a format string ({err})") from err
    if not fields <= {"prompt", "identifier", "class_noun", "caption"}:
        raise ConfigError(
            f"train.caption_template: {template!r} may only use {{prompt}}, {{identifier}}, {{class_noun}} and "
            f"{{caption}}; it uses {sorted(fields)}"
        )
    if "caption" not in fields or not fields & {"prompt", "identifier"}:
        raise ConfigError(
            f"train.caption_template: {template!r} needs {{caption}} and {{prompt}} (the instance prompt) or "
            f"{{identifier}}, e.g. '{{prompt}}, {{caption}}'"
        )


def _check_template(key: str, template: str) -> None:
    try:
        template.format(identifier="x", class_noun="y")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"{key}: {template!r} may only use {{identifier}} and {{class_noun}} ({err})") from err


def fill(template: str, common: Common) -> str:
    """Fill a prompt template with the identifier and the class noun."""
    return template.format(identifier=common.identifier, class_noun=common.class_noun)
