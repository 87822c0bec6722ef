"""The benchmark scripts run and print their tables (tiny settings here; the figures come from full runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.workspace import gpu_check_module


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_speed_prints_ratios(tiny_sd):
    out = _run("benchmarks/train_speed.py", "--steps", "2", "--warmup", "1", "--repeats", "1",
               "--variants", "posebooth", "encode_every_step")  # fmt: skip
    assert "| posebooth |" in out and "| encode_every_step |" in out
    assert "posebooth vs encode-every-step:" in out and "the peak memory" in out


@pytest.mark.slow
def test_train_speed_on_the_tiny_sdxl_with_the_16gb_savers(tiny_sd):
    out = _run("benchmarks/train_speed.py", "--steps", "2", "--warmup", "1", "--repeats", "1", "--model",
               "embedded:tiny-sdxl", "--variants", "posebooth", "checkpointing_8bit")  # fmt: skip
    assert "embedded:tiny-sdxl" in out and "| checkpointing_8bit |" in out


@pytest.mark.slow
def test_class_priors_speed_prints_the_ratio(tiny_sd):
    out = _run("benchmarks/class_priors_speed.py", "--images", "2", "--batch", "2", "--repeats", "1")
    assert "batched vs one at a time:" in out and "largest pixel difference" in out


def test_committed_sd15_configs_build_the_published_parameter_counts():
    from accelerate import init_empty_weights

    gpu_check = gpu_check_module()
    configs = gpu_check.load_configs()
    assert gpu_check.model_index_problems(configs) == []
    with init_empty_weights():  # on the meta device: no 4 GB of random weights
        modules = gpu_check.sd15_modules(configs)
    assert all(p.device.type == "meta" for m in modules.values() for p in m.parameters())
    # SD 1.5's published sizes: UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text encoder 123.06 M.
    assert gpu_check.parameter_counts(modules) == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    unet = modules["unet"].config
    assert unet.cross_attention_dim == 768 and tuple(unet.block_out_channels) == (320, 640, 1280, 1280)


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check(tiny_sd):
    """The dry run without its two pipeline checks: their code (``pipeline_check``) runs in
    tests/test_gpu_paths.py's bf16 pipeline test, and the fp32 pipeline is the session's reference run."""
    checks = ["sd15-model", "speed-posebooth", "speed-reference"]
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--keep-cache", "--checks", *checks],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| `")]
    results = {cells[0].split("`")[1]: cells[1] for cells in rows}  # check name -> result
    names = [*checks, "ratio"]
    assert list(results) == names, proc.stdout + proc.stderr[-3000:]
    assert set(results.values()) == {"passed"} and proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "STAND-IN for train_dreambooth_lora.py" in proc.stdout  # the stand-in is labelled as one
