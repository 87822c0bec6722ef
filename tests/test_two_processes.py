"""Stage 1 on two processes (`accelerate launch`, gloo on the CPU) trains like one process with the doubled
batch: the same loss curve and the same weights, and every process holds the same weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.profile import apply_profile


def _stage1_workspace(folder, batch_size: int, prior_loss_weight: float, monkeypatch) -> None:
    """``folder``: params.yaml (test profile: 3 steps of ``batch_size`` photos, flips, random prompt variants),
    the prepared photos and three class images."""
    from stages import prepare_images

    folder.mkdir()
    shutil.copytree(ROOT / "data" / "subject", folder / "data" / "subject")
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["train"].update(steps=3, lr_warmup_steps=2, batch_size=batch_size, prior_loss_weight=prior_loss_weight,
                           validation_every=0, checkpoint_every=0, export_kohya=False)  # fmt: skip
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["prepare_images"])
    prepare_images.main()
    (folder / "data/class_priors/images").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (32, 32), (60 * k, 90, 200)).save(folder / f"data/class_priors/images/class_{k:04d}.png")
    records = [{"file": f"images/class_{k:04d}.png"} for k in range(3)]
    (folder / "data/class_priors/manifest.json").write_text(json.dumps({"images": records}))


def _logged(folder, name: str) -> list[float]:
    """The values of ``name`` logged at each step (plots/train_stage1_appearance/plots/metrics/<name>.tsv)."""
    rows = (folder / "plots/train_stage1_appearance/plots/metrics" / f"{name}.tsv").read_text().splitlines()
    column = rows[0].split("\t").index(name)
    return [float(row.split("\t")[column]) for row in rows[1:]]


def test_two_processes_train_like_one_process_with_the_doubled_batch(tmp_path, monkeypatch, tiny_sd):
    """Stage 1 on two gloo processes of 1 photo each (`accelerate launch`) against one process of 2: the same
    global batches, so the same loss, gradient norm and learning rate at each step and the same trained LoRA;
    and both processes hold identical weights at the end.

    Without prior preservation: with it, the noise and timesteps are drawn for each process's (instance,
    class) batch, so one process of 2 pairs them with the samples in another order (statistically the same
    training, not the same numbers)."""
    from tests import stage1_worker

    one, two = tmp_path / "one", tmp_path / "two"
    _stage1_workspace(two, 1, 0.0, monkeypatch)
    _stage1_workspace(one, 2, 0.0, monkeypatch)
    stage1_worker.main()  # one process, here (in `one`)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "-m", "tests.stage1_worker"]  # fmt: skip
    proc = subprocess.run(launch, cwd=two, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora on 2 processes (accelerate launch): 1 instance image(s) per process" in proc.stderr

    rank0, rank1 = load_file(str(two / "weights_rank0.safetensors")), load_file(str(two / "weights_rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    for name in ("loss", "instance_loss", "grad_norm", "lr"):
        assert len(_logged(two, name)) == 3
        np.testing.assert_allclose(_logged(two, name), _logged(one, name), rtol=1e-5, err_msg=name)
    single = load_file(str(one / "weights_rank0.safetensors"))
    assert single.keys() == rank0.keys() and any("lora_B" in k and single[k].abs().max() > 0 for k in single)
    for key in single:
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-6)
    saved = [load_file(str(f / "models/stage1/pytorch_lora_weights.safetensors")) for f in (one, two)]
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.allclose(saved[0][k], saved[1][k], rtol=1e-4, atol=1e-6) for k in saved[0])
