"""Loading the base model and ControlNet through ``from_pretrained`` (hub id, local folder or embedded).

The embedded tiny models are built once into a cache folder (see ``embedded.py``) and then go through
exactly the same calls as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or
``stabilityai/stable-diffusion-xl-base-1.0``. An SDXL base (a second tokenizer and text encoder in its
folder) is recognised by its ``model_index.json``; what differs for it is gathered here: prompts go
through both text encoders (``encode_text``), the UNet and ControlNet take the pooled embedding and
the six time ids (``added_conditions``), and the pipelines are the XL ones (``sd_pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posebooth import embedded, hub, single_file


@dataclass
class Components:
    """The parts of an SD 1.5-style pipeline that posebooth trains and samples with."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler with the model's training schedule
    ref: str
    tokenizer_2: object = None  # SDXL only: its second tokenizer and text encoder (with projection)
    text_encoder_2: torch.nn.Module | None = None
    base_scheduler: object = None  # the model's own sampling scheduler (SD 1.5: PNDM), what a saved pipeline keeps

    @property
    def xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2] if self.xl else [self.tokenizer]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2] if self.xl else [self.text_encoder]


def _offline_hint(ref: str, err: Exception) -> OSError:
    return OSError(
        f"cannot load model {ref!r}: {err}. If it is a hub id, {hub.how_to_get(ref)}; 'embedded:tiny-sd15' runs offline."
    )


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_xl(ref: str) -> bool:
    """Whether ``ref`` (hub id, folder, embedded or checkpoint file) is an SDXL base, with a second text encoder:
    a local folder's ``text_encoder_2/config.json``, the hub model's model_index.json, or a checkpoint file's
    keys (its safetensors header). Reads only that."""
    from pathlib import Path

    from diffusers import DiffusionPipeline

    if single_file.is_file(ref):
        return single_file.kind(ref) == "sdxl"
    path = embedded.resolve(ref)
    if Path(path).is_dir():  # a local folder (maybe assembled by hand, without model_index.json)
        return (Path(path) / "text_encoder_2" / "config.json").exists()
    hub.require(path, "model_index.json", "base model")
    try:
        return "text_encoder_2" in DiffusionPipeline.load_config(path)
    except OSError as err:
        raise _offline_hint(ref, err) from err


def load_components(
    ref: str, device: str = "cpu", precision: str = "fp32", vae: str = "", model_config: str = ""
) -> Components:
    """Load tokenizer(s), text encoder(s), VAE, UNet (frozen, in ``precision``) and the training noise
    scheduler; SD 1.5 or SDXL, whichever ``ref`` is. ``vae``: another VAE to use (a folder or hub id holding
    only a VAE, such as the fp16-safe SDXL VAE), "" for the model's own. ``ref`` may be one checkpoint file
    (``single_file.py``), loaded with the configs of ``model_config`` ("" = the shipped ones its keys choose)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if single_file.is_file(ref):
        return _load_file_components(ref, device, precision, vae, model_config)
    path = embedded.resolve(ref)
    if not embedded.is_embedded(ref):
        hub.require(path, "unet/config.json", "base model")
    xl = is_xl(ref)
    if vae and not embedded.is_embedded(vae):
        hub.require(vae, "config.json", "VAE (common.vae)")
    dtype = DTYPES[precision]
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True, dtype=dtype)
        vae_model = (
            AutoencoderKL.from_pretrained(embedded.resolve(vae), use_safetensors=True, torch_dtype=dtype)
            if vae else AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, torch_dtype=dtype)
        )  # fmt: skip
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, torch_dtype=dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        base_scheduler = _own_scheduler(path)
        second = {}
        if xl:
            second = dict(
                tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    path, subfolder="text_encoder_2", use_safetensors=True, dtype=dtype
                ),
            )
    except OSError as err:
        raise _offline_hint(ref, err) from err
    if vae:
        _check_vae(vae, vae_model, ref, path)
    return _frozen(Components(tokenizer, text_encoder, vae_model, unet, noise_scheduler, ref, **second,
                              base_scheduler=base_scheduler), device)  # fmt: skip


def _check_vae(vae: str, vae_model, ref: str, config_path: str) -> None:
    """Stop when ``common.vae`` was made for another model than ``ref`` (whose configs are in ``config_path``)."""
    from diffusers import AutoencoderKL

    own = AutoencoderKL.load_config(config_path, subfolder="vae")
    for key in ("latent_channels", "scaling_factor"):
        if own.get(key) != vae_model.config.get(key):
            raise ValueError(
                f"common.vae: {vae!r} has {key} {vae_model.config.get(key)} but {ref!r}'s own VAE has "
                f'{own.get(key)}: it was made for another model; use one made for this base, or ""'
            )


def _frozen(comp: Components, device: str) -> Components:
    """``comp`` with its networks frozen, in eval mode, on ``device``."""
    for m in (comp.text_encoder, comp.vae, comp.unet, comp.text_encoder_2):
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
            m.eval()
            m.to(device)
    return comp


def _load_file_components(ref: str, device: str, precision: str, vae: str, model_config: str) -> Components:
    """``load_components`` of one checkpoint file: diffusers' ``from_single_file`` (``single_file.load_pipeline``),
    then the same parts as from a folder."""
    from diffusers import AutoencoderKL, DDPMScheduler

    dtype = DTYPES[precision]
    keys = single_file.shapes(ref)  # read once: a .ckpt is read whole to know them
    config = single_file.config_folder(ref, model_config, single_file.detect(keys, ref))  # the checks first
    vae_model = None
    if vae:
        if not embedded.is_embedded(vae):
            hub.require(vae, "config.json", "VAE (common.vae)")
        vae_model = AutoencoderKL.from_pretrained(embedded.resolve(vae), use_safetensors=True, torch_dtype=dtype)
        _check_vae(vae, vae_model, ref, config)
    pipe = single_file.load_pipeline(ref, model_config, dtype, vae_model, keys)
    second = {}
    if hasattr(pipe, "text_encoder_2"):
        second = dict(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)
    # the schedulers from the config folder's JSON, exactly as from a diffusers folder
    noise_scheduler = DDPMScheduler.from_pretrained(config, subfolder="scheduler")
    comp = Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, noise_scheduler, ref, **second,
                      base_scheduler=_own_scheduler(config))  # fmt: skip
    return _frozen(comp, device)


def _own_scheduler(path: str):
    """The scheduler class and settings the model folder ships (``scheduler/scheduler_config.json``)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(path, subfolder="scheduler")  # a JSON file: no weights
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{path}/scheduler: unknown scheduler class {name!r} (not in diffusers)")
    return cls.from_config(config)


def load_controlnet(
    ref: str, unet=None, device: str = "cpu", precision: str = "fp32", base: str = "", base_config: str = ""
):
    """A ControlNet from ``ref`` or, for ``"from_unet"``, initialised from ``unet`` (which must carry no LoRA).

    ``from_unet`` with a half-precision ``unet``: the ControlNet is made from the base model's UNet as stored
    (``base``, loaded again in fp32; ``base_config``: its ``common.model_config`` if it is a checkpoint file), so
    that it starts from the exact weights, not fp16-rounded ones."""
    from diffusers import ControlNetModel

    if ref == "from_unet":
        if unet is None:
            raise ValueError("train_pose.controlnet: 'from_unet' needs the base UNet")
        if unet.dtype != torch.float32 and base:
            unet = load_unet(base, base_config, torch.float32)
        return ControlNetModel.from_unet(unet).to(device, DTYPES[precision])
    if not embedded.is_embedded(ref):
        hub.require(ref, "config.json", "ControlNet")
    try:
        path = embedded.resolve(ref)
        return ControlNetModel.from_pretrained(path, use_safetensors=True, torch_dtype=DTYPES[precision]).to(device)
    except OSError as err:
        raise _offline_hint(ref, err) from err


def load_unet(ref: str, model_config: str = "", dtype: torch.dtype = torch.float32):
    """The base model's UNet alone, in ``dtype``: from a folder, hub id or embedded model, or from a checkpoint
    file (``from_single_file`` with the configs ``single_file.config_folder`` gives)."""
    from diffusers import UNet2DConditionModel

    if single_file.is_file(ref):
        config = single_file.config_folder(ref, model_config)
        return UNet2DConditionModel.from_single_file(
            ref, config=config, subfolder="unet", local_files_only=True, torch_dtype=dtype
        )
    return UNet2DConditionModel.from_pretrained(
        embedded.resolve(ref), subfolder="unet", use_safetensors=True, torch_dtype=dtype
    )


def unet_config(ref: str, model_config: str = "") -> dict:
    """The base model's UNet config (a JSON file; no weights read): of its folder, hub id or embedded model, or,
    for a checkpoint file, of the configs it is loaded with."""
    from diffusers import UNet2DConditionModel

    path = single_file.config_folder(ref, model_config) if single_file.is_file(ref) else embedded.resolve(ref)
    return dict(UNet2DConditionModel.load_config(path, subfolder="unet"))


def check_controlnet_fits(controlnet, unet, key: str) -> None:
    """Stop with a clear message when a ControlNet was made for another architecture than the base UNet
    (an SD 1.5 ControlNet with an SDXL base, or the reverse), which would otherwise fail deep in a forward."""
    want = (unet.config.cross_attention_dim, unet.config.addition_embed_type)
    have = (controlnet.config.cross_attention_dim, controlnet.config.addition_embed_type)
    if want != have:
        kind = "SDXL" if want[1] == "text_time" else "SD 1.5"
        example = ("xinsir/controlnet-openpose-sdxl-1.0, or embedded:tiny-sdxl-openpose offline" if kind == "SDXL"
                   else "lllyasviel/control_v11p_sd15_openpose, or embedded:tiny-sd15-openpose offline")  # fmt: skip
        raise ValueError(
            f"{key}: the ControlNet (cross-attention width {have[0]}, added conditioning {have[1]}) does not fit the "
            f"{kind} base model (width {want[0]}, {want[1]}); use an {kind} OpenPose ControlNet, e.g. {example}"
        )


SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def make_scheduler(name: str, config):
    """A sampling scheduler by its params name, configured like the model's own scheduler."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULER_CLASSES)}")
    return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(config)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> ``encoder_hidden_states`` (B, 77, D) of one SD 1.5 text encoder, padded to the tokenizer's
    max length like SD."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def tokenize(comp: Components, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids (B, 77) of ``prompts`` for each of the model's tokenizers (one for SD 1.5, two for SDXL)."""
    return [
        tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
        for tok in comp.tokenizers
    ]  # fmt: skip


def encode_ids(
    comp: Components, ids: list[torch.Tensor], text_encoders=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (from ``tokenize``) through the text encoders (``text_encoders``: the model's own, or the
    same wrapped for training) -> ``(encoder_hidden_states (B, 77, D), pooled (B, P) or None)``.

    SD 1.5: the last hidden state, no pooled embedding. SDXL, as its pipelines encode: both encoders'
    penultimate hidden states concatenated (D = D1 + D2), and the second encoder's projected pooled output.
    """
    encoders = text_encoders or comp.text_encoders
    if not comp.xl:
        return encoders[0](ids[0].to(comp.text_encoder.device))[0], None
    outs = [
        enc(i.to(comp.text_encoder.device), output_hidden_states=True) for enc, i in zip(encoders, ids, strict=True)
    ]
    return torch.cat([o.hidden_states[-2] for o in outs], dim=-1), outs[1].text_embeds


@torch.no_grad()
def encode_text(comp: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``encode_ids`` of ``prompts`` with the frozen text encoders."""
    return encode_ids(comp, tokenize(comp, prompts))


def added_conditions(pooled: torch.Tensor | None, ids: torch.Tensor | None) -> dict:
    """The UNet's and ControlNet's extra keyword arguments: SDXL's ``added_cond_kwargs`` (pooled text
    embedding (B, P) and time ids (B, 6)); nothing for SD 1.5 (``pooled`` is None)."""
    if pooled is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.to(pooled.device, pooled.dtype)}}


@dataclass
class Latents:
    """Cached VAE posteriors of training images: the scaled mean and standard deviation, (..., 4, h, w) each.

    The VAE is frozen, so each image is encoded once, before training; each step then draws its latents from
    the cached posterior (``sample``), as a VAE encoder called at every step would (diffusers' DreamBooth
    scripts call ``latent_dist.sample()``; their Flux script caches the distribution the same way).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, index) -> Latents:
        return Latents(self.mean[index], self.std[index])

    def unflatten(self, sizes: tuple[int, ...]) -> Latents:
        """The first dimension split into ``sizes``."""
        return Latents(self.mean.unflatten(0, sizes), self.std.unflatten(0, sizes))

    def where(self, mask: torch.Tensor, other: Latents) -> Latents:
        """``other`` where ``mask`` (broadcast, on the latents' device) is true, else these."""
        return Latents(torch.where(mask, other.mean, self.mean), torch.where(mask, other.std, self.std))

    def sample(self, generator: torch.Generator, rank_world: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """``mean + std * ε``, ε ~ N(0, I) from ``generator`` (on the CPU, so that a seed gives the same latents
        on every device). Under ``accelerate launch`` every process draws the ε of all processes' batches and
        keeps its own (see ``training.Shard``): the generators stay in step."""
        rank, world = rank_world
        eps = torch.randn((world, *self.mean.shape), generator=generator)[rank]
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor, batch_size: int = 8) -> Latents:
    """Pixels (B, 3, H, W) in [-1, 1] -> the VAE posterior (mean and std, scaled, (B, 4, H/8, W/8)), encoded
    ``batch_size`` images at a time: a real VAE on a whole set of class images at once needs tens of GB."""
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:  # SDXL's own VAE overflows in fp16: encode in fp32 (its pipelines decode so too)
        vae.to(torch.float32)
    means, stds = [], []
    try:
        for start in range(0, len(pixels), batch_size):
            dist = vae.encode(pixels[start : start + batch_size].to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    finally:
        if upcast:
            vae.to(torch.float16)
    scale = vae.config.scaling_factor
    if not means:
        return Latents(torch.empty(0), torch.empty(0))
    return Latents(torch.cat(means) * scale, torch.cat(stds) * scale)


def encode_images(vae, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8): the posterior's mean."""
    return encode_posterior(vae, pixels, batch_size).mean


def sd_pipeline(comp: Components, scheduler_name: str, controlnet=None):
    """A stock diffusers (ControlNet) pipeline, SD 1.5 or SDXL, from loaded components, with the named
    scheduler."""
    import diffusers

    parts = dict(
        vae=comp.vae,
        text_encoder=comp.text_encoder,
        tokenizer=comp.tokenizer,
        unet=comp.unet,
        scheduler=make_scheduler(scheduler_name, comp.noise_scheduler.config),
    )
    if comp.xl:  # no invisible watermark: it would make the images depend on an optional package
        parts |= dict(text_encoder_2=comp.text_encoder_2, tokenizer_2=comp.tokenizer_2, add_watermarker=False)
        name = "StableDiffusionXLPipeline" if controlnet is None else "StableDiffusionXLControlNetPipeline"
    else:
        parts |= dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        name = "StableDiffusionPipeline" if controlnet is None else "StableDiffusionControlNetPipeline"
    pipe = getattr(diffusers, name)(**parts, **({"controlnet": controlnet} if controlnet is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def drop_local_paths(folder) -> None:
    """Remove the ``_name_or_path`` diffusers and transformers write into saved configs: it records where
    the base model happened to be loaded from (a cache folder), which would make the same training give
    different files on different machines. Loading does not need it."""
    import json
    from pathlib import Path

    for config in [*Path(folder).rglob("config.json"), *Path(folder).rglob("model_index.json")]:
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def weights_fingerprint(ref: str) -> str:
    """What identifies the weights behind ``ref``, for caches of things they generate.

    Embedded: its name and builder hash (not where the cache lives, so outputs that record it are the same
    on every machine). Checkpoint file: its name and content hash (``single_file.fingerprint``). Local folder: a hash of its files' names, sizes and modification times. Hub id: the
    cached snapshot's commit, else the id itself.
    """
    import hashlib
    from pathlib import Path

    if single_file.is_file(ref):
        return single_file.fingerprint(ref)
    path = embedded.resolve(ref)
    if embedded.is_embedded(ref):
        return f"{ref}@{Path(path).name}"
    if Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        stat = "\n".join(f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
        return f"{Path(path).resolve()}#{hashlib.sha256(stat.encode()).hexdigest()[:16]}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "unet/config.json")
    return f"{ref}@{Path(cached).parents[1].name}" if isinstance(cached, str) else ref
