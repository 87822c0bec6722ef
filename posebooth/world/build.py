"""``make world``: build the world's models part by part into one folder, each with its record.

Parts: ``base`` (VAE, text encoder, UNet: ``posebooth.world.pretrain``), ``controlnet`` (the OpenPose
ControlNet on the saved base: ``posebooth.world.controlnet``), and the measuring models ``clip`` and ``dino``
(``posebooth.world.judges``) and ``pose`` (``posebooth.world.posenet``), which need no base model. Each part
writes ``records/<part>.json``: its recipe, the hash of the code that made it (the scene generator and the
part's module), the seconds it took and its figures. ``tests/test_world_pretrain.py`` checks the committed
records against the code.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

PARTS = ("base", "controlnet", "clip", "dino", "pose")
# Each part's module (under posebooth/world): its RECIPE and the file its code hash covers with the scenes.
MODULES = {"base": "pretrain", "controlnet": "controlnet", "clip": "judges", "dino": "judges", "pose": "posenet"}
FOLDERS = {"base": "base", "controlnet": "openpose", "clip": "clip", "dino": "dino", "pose": "pose"}  # under world/
RECIPE_NAMES = {"clip": "CLIP_RECIPE", "dino": "DINO_RECIPE"}  # the module attribute, where not RECIPE
# The base's helpers are the ControlNet's too: a change there retrains it.
HASHED = {"base": ("pretrain.py",), "controlnet": ("pretrain.py", "controlnet.py"), "clip": ("judges.py",),
          "dino": ("judges.py",), "pose": ("posenet.py",)}  # fmt: skip


def recipe(part: str) -> dict:
    """The recipe of ``part`` as its module defines it."""
    import importlib

    module = importlib.import_module(f"posebooth.world.{MODULES[part]}")
    return copy.deepcopy(getattr(module, RECIPE_NAMES.get(part, "RECIPE")))


def code_hash(part: str) -> str:
    """Hash of the code that makes ``part``."""
    from posebooth.world.pretrain import code_hash as hash_of

    return hash_of(*HASHED[part])


def quick(part: str, r: dict) -> dict:
    """``r`` cut down to a few steps on a few scenes: what the tests run."""
    if part == "base":
        r |= {"scenes": 48}
        for key in ("vae", "unet"):
            r[key] |= {"steps": 2, "batch": 4} | ({"warmup": 1} if key == "unet" else {})
        return r
    if part == "controlnet":
        return r | {"scenes": 24, "steps": 2, "batch": 4}
    import importlib

    return importlib.import_module(f"posebooth.world.{MODULES[part]}").quick_recipe(r)


def machine() -> dict:
    """Where a part was built: the same code and lock round differently on another CPU (see the README's world
    section), so a record says which CPU and which torch kernels made its weights."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def run_part(part: str, out: Path, r: dict) -> dict:
    """Train ``part`` into ``out`` from recipe ``r``; returns the part's figures."""
    if part == "base":
        from posebooth.world import pretrain

        return pretrain.pretrain(out, r)
    if part == "controlnet":
        from posebooth.world import controlnet

        return controlnet.train(out, r)
    if part in ("clip", "dino"):
        from posebooth.world import judges

        return (judges.train_clip if part == "clip" else judges.train_dino)(r, out / part)
    from posebooth.world import posenet

    return posenet.train_pose_detector(r, out / "pose")


def build(out: Path, parts: tuple[str, ...] | list[str] = PARTS, is_quick: bool = False) -> dict[str, dict]:
    """Build ``parts`` (in the order of ``PARTS``) into ``out``; returns their records."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown world part(s) {unknown}; choose from {list(PARTS)}")
    out = Path(out)
    records = {}
    for part in [p for p in PARTS if p in parts]:
        r = recipe(part)
        if is_quick:
            r = quick(part, r)
        code = code_hash(part)  # before training: the code that runs, even if a file is edited meanwhile
        start = time.perf_counter()
        figures = run_part(part, out, r)
        if part == "clip":  # the real CLIP tokenizer (3.6 MB): `embedded:world-clip` writes it again, offline
            (out / "clip" / "tokenizer.json").unlink(missing_ok=True)
        record = {"recipe": r, "code_hash": code, "seconds": round(time.perf_counter() - start, 1),
                  "figures": figures, "machine": machine()}  # fmt: skip
        (out / "records").mkdir(parents=True, exist_ok=True)
        path = out / "records" / f"{part}.json"
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        log.info("world part %s written in %.1f min", part, record["seconds"] / 60)
        records[part] = record
    return records
