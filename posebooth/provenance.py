"""What made a model: git revision, package versions, params, and a short model card."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("posebooth", "torch", "diffusers", "transformers", "peft", "accelerate", "dvc", "controlnet-aux")


def git_revision(cwd: str | Path = ".") -> dict:
    """HEAD's commit and whether the work tree had uncommitted changes; ``unknown`` outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(params: dict, **facts) -> dict:
    """The record saved next to every model posebooth writes: ``facts``, params, git revision, versions."""
    return {**facts, "params": params, "git": git_revision(), "packages": package_versions()}


def model_card(title: str, base_model: str, trigger: str, body: str) -> str:
    """A short Markdown model card."""
    return (
        f"# {title}\n\nMade by posebooth from the base model `{base_model}`.\n\n"
        f"**Trigger phrase:** `{trigger}`\n\n{body.strip()}\n\n"
        "The exact params, git revision and package versions are in `provenance.json`.\n"
    )


LOADING = {
    "lora": 'pipe.load_lora_weights("models/stage1")  # pytorch_lora_weights.safetensors',
    "momentum_ti": 'pipe.load_lora_weights("models/stage1")  # pytorch_lora_weights.safetensors\n'
    'pipe.load_textual_inversion("models/stage1", weight_name="learned_embeds.safetensors")',
    "textual_inversion": 'pipe.load_textual_inversion("models/stage1", weight_name="learned_embeds.safetensors")',
    "custom_diffusion": "from posebooth.subject import load_custom_diffusion  # diffusers 0.42's loader needs two "
    'fixes\nload_custom_diffusion(pipe, Path("models/stage1/pytorch_custom_diffusion_weights.safetensors"))\n'
    "# and, if the identifier's embedding was learned:\n"
    'pipe.load_textual_inversion("models/stage1", weight_name="learned_embeds.safetensors")',
    "full": '# the folder is a whole pipeline: from_pretrained("models/stage1") above',
    "textual_inversion_xl": "from safetensors.torch import load_file  # one row per text encoder, token in metadata\n"
    'emb = load_file("models/stage1/learned_embeds.safetensors")\n'
    'pipe.load_textual_inversion(emb["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)\n'
    'pipe.load_textual_inversion(emb["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)',
}


# train.adapter loha / lokr: PEFT adapters in models/stage1/peft/, which no diffusers pipeline loader reads
PEFT_LOADING = (
    "from posebooth.lora import load_adapters  # LoHa / LoKr: PEFT adapters in models/stage1/peft/\n"
    'load_adapters(pipe, "models/stage1", "subject")'
)


def _loader(base: str) -> str:
    """The diffusers method that loads ``base``: ``from_single_file`` for a checkpoint file (A1111 layout)."""
    from posebooth.single_file import is_file

    return "from_single_file" if is_file(base) else "from_pretrained"


def stage1_card(
    base_model: str, trigger: str, method: str = "lora", xl: bool = False, identifier: str = "", adapter: str = "lora"
) -> str:
    base = "models/stage1" if method == "full" else base_model
    load = LOADING[f"{method}_xl" if xl and f"{method}_xl" in LOADING else method].replace("TOKEN", repr(identifier))
    if adapter in ("loha", "lokr"):
        load = load.replace(LOADING["lora"], PEFT_LOADING)
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    return model_card(
        f"posebooth subject, {method} (stage 1)",
        base_model,
        trigger,
        f"""
## Load it in diffusers

```python
from pathlib import Path
from diffusers import {pipeline}

pipe = {pipeline}.{_loader(base)}("{base}")
{load}
image = pipe("{trigger} on the beach").images[0]
```
""",
    )


def stage2_card(
    base_model: str, trigger: str, xl: bool = False, controlnet_base: str | None = None, stage1: str | None = None
) -> str:
    """``controlnet_base``: with a ControlNet LoRA (``train_pose.mode: lora``), the ControlNet it goes on
    (a hub id or folder, or ``models/stage2/controlnet_base``); None for a fully trained ControlNet.
    ``stage1``: the stage-1 folder, whose adapter's kind (a LoHa or LoKr in ``peft/``) the loading code follows."""
    from posebooth.lora import PEFT_DIR

    subject = LOADING["lora"].split("  #")[0]  # pipe.load_lora_weights("models/stage1")
    if stage1 is not None and (Path(stage1) / PEFT_DIR).is_dir():
        subject = PEFT_LOADING
    pipeline = "StableDiffusionXLControlNetPipeline" if xl else "StableDiffusionControlNetPipeline"
    if controlnet_base is None:
        load = 'controlnet = ControlNetModel.from_pretrained("models/stage2/controlnet")'
    else:
        load = (f'controlnet = ControlNetModel.from_pretrained("{controlnet_base}")\n'
                'controlnet.load_lora_adapter("models/stage2/controlnet_lora", prefix=None)  # the trained LoRA')  # fmt: skip
    return model_card(
        "posebooth pose ControlNet (stage 2)",
        base_model,
        trigger,
        f"""
## Load it in diffusers

The ControlNet was trained with the stage-1 LoRA in the UNet: load both.

```python
from diffusers import ControlNetModel, {pipeline}
from PIL import Image

{load}
pipe = {pipeline}.{_loader(base_model)}("{base_model}", controlnet=controlnet)
{subject}
pose_map = Image.open("samples/poses/standing.png")  # OpenPose skeleton on black
image = pipe("{trigger} waving", image=pose_map).images[0]
```
""",
    )
