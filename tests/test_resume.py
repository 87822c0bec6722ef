"""A training stage killed with SIGKILL resumes from its last checkpoint and ends bit-identical.

The kill comes from the stage itself at an exact point (``POSEBOOTH_FAILPOINT``, posebooth/outputs.py), right after
a given checkpoint is written, so no timing decides where it stops; the stage runs with a cache of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.profile import apply_profile

STAGE = "stages.train_stage1_appearance"


def _run(cwd: Path, env: dict, out: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=str(ROOT), **({"POSEBOOTH_FAILPOINT": failpoint} if failpoint else {}))
    cmd = [sys.executable, "-m", STAGE, "--out", f"models/{out}", "--metrics", f"{out}.json", "--plots", f"plots_{out}"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["lora", "momentum_ti"])  # momentum_ti: killed in its second phase
def test_sigkilled_training_resumes_to_identical_weights(tmp_path, monkeypatch, method):
    from posebooth import embedded
    from stages import generate_class_priors, prepare_images
    from tests.workspace import own_cache

    shutil.copytree(ROOT / "data" / "subject", tmp_path / "data" / "subject")
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["common"]["seed"] = 31337
    # 12 optimizer steps (of 2 accumulated batches each), a checkpoint after steps 4 and 8, validation images after
    # steps 4, 8 and 12; momentum TI: 4 LoRA steps (no checkpoint: the last step has none), then 12 momentum steps.
    # ema_decay: the EMA of the weights is saved, so it must be checkpointed and resumed too.
    params["train"].update(steps=12, checkpoint_every=4, gradient_accumulation_steps=2, flip_prob=0.5,
                           validation_every=4, validation_steps=2, method=method, ema_decay=0.9)  # fmt: skip
    if method == "momentum_ti":
        params["train"].update(steps=4, ti_steps=12)
    last_phase = "momentum" if method == "momentum_ti" else "lora"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    for stage in (prepare_images, generate_class_priors):
        monkeypatch.setattr(sys, "argv", [stage.__name__])
        stage.main()
    env = own_cache(tmp_path, "resume", str(embedded.cache_root()))
    ckpt_root = Path(env["POSEBOOTH_CACHE"]) / "checkpoints" / "train_stage1_appearance"

    full = _run(tmp_path, env, "a")
    assert full.returncode == 0, full.stderr[-3000:]
    assert not list(ckpt_root.glob("*/*/state.json")), "a finished training leaves no checkpoint behind"

    # SIGKILL right after the checkpoint of step 8 (momentum TI first saves the end of its LoRA phase).
    nth = 3 if method == "momentum_ti" else 2
    killed = _run(tmp_path, env, "b", failpoint=f"checkpoint-saved@{nth}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "models" / "b").exists() and not (tmp_path / "b.json").exists()  # nothing half-written
    (state,) = ckpt_root.glob(f"*/{last_phase}/state.json")
    assert json.loads(state.read_text())["step"] == 8
    # The curve is written as training goes (readable, and plotted, during a run): the kill leaves its first rows.
    partial = (tmp_path / "plots_b/plots/metrics/loss.tsv").read_text().splitlines()
    whole = (tmp_path / "plots_a/plots/metrics/loss.tsv").read_text().splitlines()
    assert 1 + 8 <= len(partial) < len(whole) and partial == whole[: len(partial)]

    resumed = _run(tmp_path, env, "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {last_phase} from the checkpoint after step 8" in resumed.stderr
    out_a, out_b = tmp_path / "models/a", tmp_path / "models/b"
    files = sorted(str(p.relative_to(out_a)) for p in out_a.rglob("*.safetensors"))
    assert files == sorted(str(p.relative_to(out_b)) for p in out_b.rglob("*.safetensors"))
    # the LoRA and its kohya export in exports/; momentum TI: the embedding and its export too
    assert len(files) == (4 if method == "momentum_ti" else 2)
    assert all(_sha(tmp_path / "models/a" / f) == _sha(tmp_path / "models/b" / f) for f in files)
    for name in ("loss", "lr", "grad_norm"):
        curve = f"plots/metrics/{name}.tsv"
        assert (tmp_path / "plots_a" / curve).read_text() == (tmp_path / "plots_b" / curve).read_text(), name
    images = {str(p.relative_to(tmp_path / "plots_a")): _sha(p) for p in (tmp_path / "plots_a").rglob("*.png")}
    assert len(images) == 2 * (4 if method == "momentum_ti" else 3)  # every one, also those logged before the kill
    assert images == {str(p.relative_to(tmp_path / "plots_b")): _sha(p) for p in (tmp_path / "plots_b").rglob("*.png")}
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
