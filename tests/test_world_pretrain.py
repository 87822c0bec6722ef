"""The world's build code runs and writes models that load like their real counterparts (SD 1.5, an OpenPose
ControlNet, CLIP, DINO, a pose detector); the committed weights are the ones its recipes and code make."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from posebooth import embedded
from posebooth.world import build, pretrain
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory) -> str:
    """``posebooth world pretrain --quick``: every part for a few steps (in its own process: it fixes the
    thread count)."""
    out = tmp_path_factory.mktemp("world") / "world"
    proc = subprocess.run([sys.executable, "-m", "posebooth", "world", "pretrain", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_pretraining_writes_a_world_that_loads_and_samples_like_sd15(quick_world, tmp_path, monkeypatch):
    """The folders load through the same code as a hub model (``embedded:world`` assembles them with the real
    CLIP tokenizer), the ControlNet fits the UNet, and a stock ControlNet pipeline makes 64 px images."""
    from posebooth.generation import generate
    from posebooth.models import check_controlnet_fits, load_components, load_controlnet, sd_pipeline

    for part in build.PARTS:
        record = json.loads((quick_world / "records" / f"{part}.json").read_text())
        assert record["code_hash"] == build.code_hash(part), part
        assert record["machine"] == build.machine(), "a record names the CPU and torch that made it"
    assert record["recipe"] != build.recipe(part), "a quick run records its cut-down recipe"
    monkeypatch.setattr(embedded, "WORLD", quick_world)
    monkeypatch.setenv("POSEBOOTH_CACHE", str(tmp_path))
    comp = load_components("embedded:world")
    assert len(comp.tokenizer) == 49408 and comp.vae.config.scaling_factor > 0
    assert comp.unet.config.sample_size == 16 and comp.unet.dtype == torch.float32  # fp16 on disk, fp32 loaded
    controlnet = load_controlnet("embedded:world-openpose")
    check_controlnet_fits(controlnet, comp.unet, "train_pose.controlnet")
    from PIL import Image

    pose_map = Image.new("RGB", (64, 64))
    (image,) = generate(sd_pipeline(comp, "ddim", controlnet), "a photo of a red robot on the beach", [0], steps=2,
                        guidance_scale=5.0, resolution=64, control_image=pose_map)  # fmt: skip
    assert image.size == (64, 64)


@pytest.mark.parametrize("part", build.PARTS)
def test_the_committed_world_is_what_its_recipe_and_code_make(part):
    """world/records/<part>.json records the recipe and the code hash that made the committed weights of each
    part: a change to either without `make world` (and committing its output) fails here."""
    record = json.loads((embedded.WORLD / "records" / f"{part}.json").read_text())
    assert record["recipe"] == json.loads(json.dumps(build.recipe(part)))
    assert record["code_hash"] == build.code_hash(part), f"the code of world part {part} changed: run `make world`"


def test_the_committed_world_is_fp16_and_small():
    """Every weight file is fp16 safetensors in its part's folder, 25 MB at most in all; the UNet is the recipe's."""
    from safetensors import safe_open

    world = embedded.WORLD
    unet = json.loads((world / "base/unet/config.json").read_text())
    for key, value in pretrain.unet_config().items():
        assert unet[key] == (list(value) if isinstance(value, tuple) else value), key
    files = [p for p in world.rglob("*.safetensors")]
    assert {p.parent.name for p in files} == {"unet", "vae", "text_encoder", "openpose", "clip", "dino", "pose"}
    for path in files:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    assert sum(p.stat().st_size for p in world.rglob("*") if p.is_file()) <= 25 * 2**20
