"""The benchmark scripts run and print their tables (tiny settings here; the figures come from full runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_speed_prints_ratios(tiny_sd):
    out = _run("benchmarks/train_speed.py", "--steps", "2", "--warmup", "1", "--repeats", "1",
               "--variants", "posebooth", "encode_every_step")  # fmt: skip
    assert "| posebooth |" in out and "| encode_every_step |" in out
    assert "posebooth vs encode-every-step:" in out and "the peak memory" in out


def test_train_speed_on_the_tiny_sdxl_with_the_16gb_savers(tiny_sd):
    out = _run("benchmarks/train_speed.py", "--steps", "2", "--warmup", "1", "--repeats", "1", "--model",
               "embedded:tiny-sdxl", "--variants", "posebooth", "checkpointing_8bit")  # fmt: skip
    assert "embedded:tiny-sdxl" in out and "| checkpointing_8bit |" in out


def test_class_priors_speed_prints_the_ratio(tiny_sd):
    out = _run("benchmarks/class_priors_speed.py", "--images", "2", "--batch", "2", "--repeats", "1")
    assert "batched vs one at a time:" in out and "largest pixel difference" in out
