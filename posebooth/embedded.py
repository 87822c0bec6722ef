"""The embedded tiny models: SD 1.5- and SDXL-architecture pipelines, their ControlNets, stand-in metric backbones.

Built deterministically from a fixed seed, saved as standard diffusers / transformers folders in a cache
keyed by this file's hash, and then loaded through the same ``from_pretrained`` path as a hub id. They
let the whole pipeline run offline on a CPU in minutes; their outputs measure nothing about image quality.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PREFIX = "embedded:"
SEED = 20260101
# name -> (builder function name, subfolder of the built folder that the name refers to)
NAMES = {
    "tiny-sd15": ("build_tiny_sd15", ""),
    "tiny-sd15-openpose": ("build_tiny_sd15", "controlnet"),
    "tiny-sdxl": ("build_tiny_sdxl", ""),
    "tiny-sdxl-openpose": ("build_tiny_sdxl", "controlnet"),
    "world": ("build_world", ""),  # pretrained on the procedural world (posebooth/world), committed in world/
    "world-openpose": ("build_world", "openpose"),
    "world-clip": ("build_world", "clip"),  # the world's measuring models (posebooth/world/judges.py, posenet.py)
    "world-dino": ("build_world", "dino"),
    "world-pose": ("build_world", "pose"),
    "tiny-clip": ("build_tiny_clip", ""),
    "tiny-dino": ("build_tiny_dino", ""),
}


def is_embedded(ref: str) -> bool:
    """True when ``ref`` names an embedded model (``embedded:<name>``)."""
    return ref.startswith(PREFIX)


def cache_root() -> Path:
    """Folder holding built embedded models: ``$POSEBOOTH_CACHE`` or ``~/.cache/posebooth``."""
    return Path(os.environ.get("POSEBOOTH_CACHE", Path.home() / ".cache" / "posebooth")) / "embedded"


def builder_hash() -> str:
    """Hash of this module's source: a change to any builder gives a new cache folder."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def resolve(ref: str) -> str:
    """Turn ``embedded:<name>`` into a local folder (building it once); return any other ref unchanged."""
    if not is_embedded(ref):
        return ref
    name = ref[len(PREFIX) :]
    if name not in NAMES:
        raise ValueError(f"unknown embedded model {ref!r}; known: {', '.join(PREFIX + n for n in NAMES)}")
    builder, sub = NAMES[name]
    version = builder_hash() + (f"-{world_hash()}" if builder == "build_world" else "")
    folder = cache_root() / f"{builder.removeprefix('build_')}-{version}"
    if not (folder / ".complete").exists():
        _build_atomically(folder, globals()[builder])
    return str(folder / sub) if sub else str(folder)


def _build_atomically(folder: Path, build) -> None:
    """Build into a temporary sibling and rename, so concurrent stages never see a half-built folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        log.info("building embedded model into %s", folder)
        build(tmp)
        (tmp / ".complete").write_text(builder_hash())
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clip_tokenizer_files(out: Path) -> None:
    """Write the real 49,408-token CLIP BPE tokenizer (vocab.json, merges.txt) from open_clip's vocabulary.

    Same construction as OpenAI's CLIP: 256 byte symbols, the same with ``</w>``, one token per merge
    (lines 1..48894 after the header), then the two special tokens.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    clip_tokenizer_files(folder)
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    return tok


# The transformer size of every tiny text and vision tower (CLIP text encoder, CLIP, DINO-style ViT).
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _tiny_vae(**config):
    """The tiny 8x VAE (four blocks, three downsamplings, like SD's) of both tiny pipelines."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **config,
    )


def _save(out: Path, pipe, controlnet) -> None:
    """A tiny pipeline as a diffusers folder, its ControlNet in ``controlnet/``; the tokenizer sources go."""
    pipe.save_pretrained(out, safe_serialization=True)
    controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    shutil.rmtree(out / "_tok")


WORLD = Path(__file__).resolve().parents[1] / "world"  # the world's committed weights (make world)


def world_hash() -> str:
    """Hash of the world's committed files: new weights give a new cache folder (and new cache keys)."""
    h = hashlib.sha256()
    files = sorted(p for p in WORLD.rglob("*") if p.is_file()) if WORLD.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{WORLD}: the world's weights are missing; run `make world` (about an hour)")
    for f in files:
        h.update(str(f.relative_to(WORLD)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def build_world(out: Path) -> None:
    """The world's pretrained SD 1.5-architecture pipeline (``world/base``) with the real CLIP tokenizer, its
    OpenPose ControlNet (``world/openpose``) and its measuring models (``clip``, ``dino``, ``pose``)."""
    shutil.copytree(WORLD / "base", out, dirs_exist_ok=True)
    clip_tokenizer_files(out / "tokenizer")
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))  # fmt: skip
    for part in ("openpose", "clip", "dino", "pose"):
        if (WORLD / part).is_dir():
            shutil.copytree(WORLD / part, out / part)
    if (out / "clip").is_dir():  # committed without its tokenizer files (the real CLIP vocabulary, 3.6 MB)
        clip_tokenizer_files(out / "clip")


def build_tiny_sd15(out: Path) -> None:
    """A tiny Stable Diffusion 1.5 architecture: 8x VAE (four blocks), cross-attention UNet, CLIP text encoder."""
    from diffusers import (
        ControlNetModel,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    tokenizer = _clip_tokenizer(out / "_tok")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32, **TINY_TOWER)
    )
    vae = _tiny_vae()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    # Made from the UNet before any LoRA is injected: from_unet fails on a PEFT-wrapped UNet.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    # SD 1.5's scheduler settings (scaled_linear betas, epsilon prediction).
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(out, pipe, controlnet)


def build_tiny_sdxl(out: Path) -> None:
    """A tiny SDXL architecture: two CLIP text encoders of different widths (the second with a projection
    giving the pooled embedding), ``text_time`` added conditioning, 8x VAE with SDXL's scaling factor, and
    its ControlNet (made from the UNet, like the SDXL OpenPose ControlNets' layout)."""
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(SEED + 3)
    tokenizer = _clip_tokenizer(out / "_tok")
    files = dict(vocab=str(out / "_tok" / "vocab.json"), merges=str(out / "_tok" / "merges.txt"), model_max_length=77)
    tokenizer_2 = CLIPTokenizer(**files, pad_token="!")  # noqa: S106 (SDXL's second tokenizer pads with "!")
    tower = dict(vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tower, **TINY_TOWER))  # CLIP ViT-L's place (768 wide in SDXL)
    text_encoder_2 = CLIPTextModelWithProjection(  # OpenCLIP ViT-bigG's place (1280 wide)
        CLIPTextConfig(**tower, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=16,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 64,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32,  # six time ids, then the pooled embedding
    )
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    _save(out, pipe, controlnet)


def build_tiny_clip(out: Path) -> None:
    """A tiny random CLIP (vision + text towers) with the real tokenizer: a stand-in for CLIP-I / CLIP-T."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(SEED + 1)
    tokenizer = _clip_tokenizer(out / "_tok")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **TINY_TOWER),
        vision_config=dict(image_size=32, patch_size=8, **TINY_TOWER),
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    shutil.rmtree(out / "_tok")


def build_tiny_dino(out: Path) -> None:
    """A tiny random ViT with DINO's layout (CLS token first): a stand-in for DINO ViT-S/16."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(SEED + 2)
    config = ViTConfig(image_size=32, patch_size=8, **TINY_TOWER)
    ViTModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
