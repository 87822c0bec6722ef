"""A training stage killed with SIGKILL resumes from its last checkpoint and ends bit-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.profile import apply_profile

STAGE = "stages.train_stage1_appearance"


def _start(cwd: Path, out: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", STAGE, "--out", f"models/{out}", "--metrics", f"{out}.json", "--plots", f"plots_{out}"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["lora", "momentum_ti"])  # momentum_ti: killed in its second phase
def test_sigkilled_training_resumes_to_identical_weights(tmp_path, monkeypatch, method):
    from stages import generate_class_priors, prepare_images

    shutil.copytree(ROOT / "data" / "subject", tmp_path / "data" / "subject")
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["common"]["seed"] = 31337
    params["train"].update(steps=60, checkpoint_every=5, gradient_accumulation_steps=2, flip_prob=0.5,
                           validation_every=4, validation_steps=2, method=method)  # fmt: skip
    if method == "momentum_ti":
        params["train"].update(steps=10, ti_steps=50)
    last_phase = "momentum" if method == "momentum_ti" else "lora"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    for stage in (prepare_images, generate_class_priors):
        monkeypatch.setattr(sys, "argv", [stage.__name__])
        stage.main()
    ckpt_root = Path(os.environ["POSEBOOTH_CACHE"]) / "checkpoints" / "train_stage1_appearance"

    full = _start(tmp_path, "a")
    assert full.wait(timeout=600) == 0, full.stderr.read()
    assert not list(ckpt_root.glob("*/*/state.json")), "a finished training leaves no checkpoint behind"

    killed = _start(tmp_path, "b")
    deadline = time.monotonic() + 600
    while not list(ckpt_root.glob(f"*/{last_phase}/state.json")):
        assert killed.poll() is None, "finished before its first checkpoint: make the run longer"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the whole process group, as a stopped `dvc` would leave it
    killed.wait(timeout=60)
    assert not (tmp_path / "models" / "b").exists() and not (tmp_path / "b.json").exists()  # nothing half-written
    step = json.loads(next(ckpt_root.glob(f"*/{last_phase}/state.json")).read_text())["step"]
    assert 5 <= step < 50

    resumed = _start(tmp_path, "b")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert f"resuming {last_phase} from the checkpoint after step {step}" in resumed.stderr.read()
    files = sorted(p.name for p in (tmp_path / "models/a").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "models/b").glob("*.safetensors"))
    assert len(files) == (3 if method == "momentum_ti" else 2)  # (the LoRA, its kohya export, the embedding)
    assert all(_sha(tmp_path / "models/a" / f) == _sha(tmp_path / "models/b" / f) for f in files)
    assert (tmp_path / "plots_a/loss.tsv").read_text() == (tmp_path / "plots_b/loss.tsv").read_text()
    images = {p.name: _sha(p) for p in (tmp_path / "plots_a/images/validation").glob("*.png")}
    assert len(images) == 2 * 15  # every validation image, also those logged before the kill
    assert images == {p.name: _sha(p) for p in (tmp_path / "plots_b/images/validation").glob("*.png")}
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
