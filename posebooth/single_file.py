"""Base models from one checkpoint file in the original (A1111 / LDM / SGM) layout, loaded offline.

The fine-tunes people start from (Civitai, A1111's ``models/Stable-diffusion``) are single ``.safetensors``
files holding the UNet (``model.diffusion_model.``), the VAE (``first_stage_model.``) and the text encoder(s)
(SD 1.5: ``cond_stage_model.transformer.``; SDXL: ``conditioner.embedders.0.transformer.`` and the OpenCLIP
``conditioner.embedders.1.model.``). diffusers' ``from_single_file`` converts them, given a folder of diffusers
configs: the ones shipped in ``posebooth/configs/{sd15,sdxl}`` (from the hub repos the file's keys point to,
read only from the file's header), or ``common.model_config``. ``.ckpt`` / ``.pt`` / ``.bin`` files are pickles:
loaded only if ``torch.load(weights_only=True)`` accepts them, which refuses any pickle that would run code.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"  # diffusers configs of SD 1.5 and SDXL base (README there)
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
KINDS = {"sd15": "SD 1.5", "sdxl": "SDXL"}

# Keys of the original layouts that tell the architectures apart (as ComfyUI's model_detection and diffusers'
# single_file_utils CHECKPOINT_KEY_NAMES read them)
UNET = "model.diffusion_model."
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"  # (320, in_channels, 3, 3): 4, or 9 for inpainting
SDXL_OPENCLIP = "conditioner.embedders.1."  # SDXL base's second text encoder (OpenCLIP ViT-bigG)
SDXL_REFINER = "conditioner.embedders.0.model."  # the refiner's only text encoder is OpenCLIP
SD2_OPENCLIP = "cond_stage_model.model."  # SD 2.x's OpenCLIP ViT-H text encoder
SD15_CLIP = "cond_stage_model.transformer."
VAE = "first_stage_model."
VPRED = ("v_pred", "edm_vpred.sigma_max")  # markers some v-prediction fine-tunes carry (ComfyUI reads them)
LORA_MARKERS = ("lora_unet_", "lora_te", "lora_down", "lora_up", "lora_A", "lora_B", ".hada_w1", ".lokr_w1")


def is_file(ref: str) -> bool:
    """Whether ``ref`` names a single weights file (by its suffix, as ``config.MODEL_FILE_SUFFIXES``; it need not
    exist yet). Hub ids and folders have none of these suffixes."""
    return Path(ref).suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES


def _existing(ref: str) -> Path:
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(
            f"common.model: {ref} does not exist; give the path of a .safetensors checkpoint (SD 1.5 or SDXL, as "
            "A1111 and ComfyUI load), a diffusers folder, a hub id or an embedded model"
        )
    return path


def safetensors_header(path: Path) -> dict[str, list[int]]:
    """Every tensor's name and shape in a ``.safetensors`` file, read from its header alone (the first 8 bytes
    give the length of a JSON header; the tensors after it are not read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"common.model: {path} is not a .safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise ValueError(f"common.model: {path} is not a .safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"common.model: {path} is not a .safetensors file ({err})") from err
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def load_pickle(path: Path) -> dict:
    """The state dict of a ``.ckpt`` / ``.pt`` / ``.bin`` checkpoint, read with ``weights_only=True``: tensors and
    plain containers only. Refused, with why, when it needs more (a pickle can run any code as it loads)."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle's UnpicklingError (RuntimeError, EOFError: a damaged file)
        raise ValueError(
            f"common.model: {path} is a pickle ({path.suffix}) that torch.load(weights_only=True) refuses: loading it "
            "fully could run code hidden in it, which posebooth never does. Get the .safetensors version of this "
            "model, or convert it on a machine you trust. "
            f"(torch: {str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from err
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning / LDM checkpoints wrap the weights
    if not isinstance(state, dict):
        raise ValueError(f"common.model: {path} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"common.model: {path} holds no tensors (at its top level or under 'state_dict')")
    return tensors


def shapes(ref: str) -> dict[str, list[int]]:
    """Every tensor's name and shape in the checkpoint file ``ref`` (a ``.safetensors`` header, or a pickle read
    with ``weights_only=True``). A pickle is read whole to know them, and a stage asks several times (the params
    check, the architecture, the loading): they are kept in the posebooth cache as ``fingerprint``'s digests."""
    path = _existing(ref)
    if path.suffix.lower() in SAFE_SUFFIXES:
        return safetensors_header(path)
    return json.loads(_cached(path, "file-shapes", lambda: json.dumps(
        {k: list(v.shape) for k, v in load_pickle(path).items()}, sort_keys=True)))  # fmt: skip


def detect(keys: dict[str, list[int]], ref: str = "") -> str:
    """``"sd15"`` or ``"sdxl"`` from a checkpoint's tensor names (and the UNet's input channels); anything else
    (a LoRA, SD 2.x, an SDXL refiner, an inpainting or v-prediction model, an unknown layout) is refused,
    saying what it is and what to do."""
    where = f"common.model: {ref}" if ref else "common.model"
    if not any(k.startswith(UNET) for k in keys):
        if any(m in k for k in keys for m in LORA_MARKERS):
            raise ValueError(
                f"{where} is a LoRA (or LyCORIS) file, not a full checkpoint: set common.model to the base model it "
                "was made for (a checkpoint file, a diffusers folder or a hub id); posebooth trains its own LoRA"
            )
        some = ", ".join(sorted(keys)[:3])
        raise ValueError(
            f"{where}: no {UNET}* keys, so not an SD 1.5 or SDXL checkpoint in the original (A1111) layout "
            f"(first keys: {some}); give a full checkpoint file, or a diffusers folder"
        )
    if any(k in keys for k in VPRED):
        raise ValueError(f"{where}: a v-prediction model; posebooth trains epsilon-prediction SD 1.5 and SDXL only")
    if any(k.startswith(SD2_OPENCLIP) for k in keys):
        raise ValueError(
            f"{where}: an SD 2.x checkpoint (OpenCLIP text encoder, mostly v-prediction), which posebooth does not "
            "train; use an SD 1.5 or SDXL checkpoint"
        )
    xl = any(k.startswith(SDXL_OPENCLIP) for k in keys)
    if not xl and any(k.startswith(SDXL_REFINER) for k in keys):
        raise ValueError(f"{where}: an SDXL refiner; posebooth trains the SDXL base (or an SD 1.5) model")
    channels = keys[CONV_IN][1] if CONV_IN in keys and len(keys[CONV_IN]) == 4 else 4
    if channels != 4:
        what = "an inpainting model" if channels == 9 else f"a UNet with {channels} input channels"
        raise ValueError(
            f"{where}: {what} (the base model needs 4 latent channels); use the non-inpainting version of the model"
        )
    if not xl and not any(k.startswith(SD15_CLIP) for k in keys):
        raise ValueError(
            f"{where}: has a UNet but neither SD 1.5's ({SD15_CLIP}*) nor SDXL's ({SDXL_OPENCLIP}*) text encoder; "
            "give a full checkpoint (UNet, VAE and text encoders)"
        )
    return "sdxl" if xl else "sd15"


def kind(ref: str) -> str:
    """``"sd15"`` or ``"sdxl"``: the architecture of the checkpoint file ``ref``, from its keys."""
    return detect(shapes(ref), ref)


def config_folder(ref: str, model_config: str = "", found: str = "") -> str:
    """The folder of diffusers configs to load the file ``ref`` with: ``model_config`` (a diffusers folder or an
    embedded model, whose architecture must match the file's) or, for ``""``, the shipped one for its keys.
    ``found``: the file's ``kind`` if already known (a pickle is read whole to know it)."""
    from posebooth import embedded

    found = found or kind(ref)
    if not model_config:
        return str(CONFIGS / found)
    folder = embedded.resolve(model_config)
    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"common.model_config: {model_config!r} is not a diffusers folder (no model_index.json); give a local "
            'diffusers folder or an embedded model whose configs fit common.model, or "" for the shipped ones'
        )
    config_xl = (Path(folder) / "text_encoder_2" / "config.json").exists()
    if config_xl != (found == "sdxl"):
        raise ValueError(
            f"common.model_config: {model_config!r} is {'an SDXL' if config_xl else 'an SD 1.5'} model but "
            f'common.model {ref} is {KINDS[found]} (by its keys); use configs of the same architecture, or ""'
        )
    return folder


def _tokenizer(config: Path, name: str):
    """A CLIP tokenizer from ``config/name``: the folder's own files when it has a vocabulary, else the shipped
    settings over the real CLIP BPE vocabulary (written once into the cache from open_clip's copy)."""
    from transformers import CLIPTokenizer

    folder = config / name
    if (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists():
        return CLIPTokenizer.from_pretrained(str(folder))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    bpe = clip_vocabulary()
    keys = ("model_max_length", "bos_token", "eos_token", "unk_token", "pad_token")
    return CLIPTokenizer(
        vocab=str(bpe / "vocab.json"), merges=str(bpe / "merges.txt"), **{k: settings[k] for k in keys}
    )


def clip_vocabulary() -> Path:
    """A folder with the CLIP BPE ``vocab.json`` and ``merges.txt`` (3.6 MB, the same for SD 1.5's tokenizer and
    both of SDXL's), built once into the posebooth cache rather than shipped twice in the repository."""
    from posebooth import embedded

    folder = embedded.cache_root() / "clip-bpe"
    if not (folder / ".complete").exists():
        embedded._build_atomically(folder, embedded.clip_tokenizer_files)
    return folder


def load_pipeline(ref: str, model_config: str = "", dtype=None, vae=None, keys: dict | None = None):
    """The stock diffusers pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) of the checkpoint
    file ``ref``, through ``from_single_file`` with the configs of ``config_folder``, offline, in ``dtype`` (None:
    fp32). ``vae``: a VAE to use instead of the file's own (``common.vae``); a file without VAE weights needs one.
    ``keys``: the file's ``shapes`` if already read."""
    import diffusers

    keys = keys or shapes(ref)
    found = detect(keys, ref)
    config = Path(config_folder(ref, model_config, found))
    if vae is None and not any(k.startswith(VAE) for k in keys):
        raise ValueError(
            f"common.model: {ref} has no VAE weights ({VAE}*): set common.vae to a VAE made for {KINDS[found]} "
            "(a folder or hub id)"
        )
    parts = {"tokenizer": _tokenizer(config, "tokenizer")}
    if found == "sdxl":
        name = "StableDiffusionXLPipeline"
        parts |= {"tokenizer_2": _tokenizer(config, "tokenizer_2"), "add_watermarker": False}
    else:
        name = "StableDiffusionPipeline"
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if vae is not None:
        parts["vae"] = vae
    log.info("loading %s checkpoint %s with the configs in %s", KINDS[found], ref, config)
    try:
        pipe = getattr(diffusers, name).from_single_file(
            str(Path(ref)), config=str(config), local_files_only=True, torch_dtype=dtype, **parts
        )
    except ValueError as err:  # diffusers: "Cannot load ... expected shape ..." when a size differs
        raise ValueError(
            f"common.model: {ref} does not fit the {KINDS[found]} configs in {config} ({str(err).split('. ')[0]}); "
            "set common.model_config to a diffusers folder with this model's own configs"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fingerprint(ref: str) -> str:
    """The file's name and the SHA-256 of its content (what A1111 and Civitai identify checkpoints by), so that a
    replaced file under the same name is not mistaken for the old one, and a moved one still matches.

    Hashing a 7 GB SDXL file takes seconds to minutes, and four stages ask: the digest is kept in the posebooth
    cache under the file's path, size and modification time (as A1111's ``cache.json`` keeps its hashes)."""
    import hashlib

    path = _existing(ref)

    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()

    return f"{path.name}@sha256:{_cached(path, 'file-hashes', digest)[:16]}"


def _cached(path: Path, kind: str, compute: Callable[[], str]) -> str:
    """``compute()``, kept in the posebooth cache (``<cache>/<kind>/``) under the file's path, size and
    modification time: a replaced or touched file is read again."""
    import hashlib

    from posebooth import embedded

    stat = path.stat()
    where = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cached = embedded.cache_root().parent / kind / hashlib.sha256(where.encode()).hexdigest()[:32]
    if cached.is_file():
        return cached.read_text().rstrip("\n")
    value = compute()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, cached)  # atomic: concurrent stages never read half a value
    return value
