"""Pieces both training stages share: batch sampling, the optimizer, step logging with dvclive."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from posebooth import outputs


def sample_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random indices into ``n`` items (with replacement, so tiny sets still fill a batch)."""
    return torch.randint(0, n, (batch_size,), generator=generator)


def autocast(device: str, precision: str):
    """Mixed precision for the forward pass: frozen weights run in ``precision``, trained ones stay fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW as in diffusers' DreamBooth and ControlNet scripts."""
    params = list(params)
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class StepLog:
    """dvclive logging inside a DVC stage, written atomically when training ends.

    dvclive writes into a temporary folder (``save_dvc_exp=False``, no dvc.yaml of its own: the plots
    are declared in the project's dvc.yaml); on ``close`` its ``metrics.json`` becomes ``metrics_path``
    and its ``plots/metrics/*.tsv`` become ``plots_dir``.
    """

    def __init__(self, metrics_path: str | Path, plots_dir: str | Path):
        from dvclive import Live

        self.metrics_path, self.plots_dir = Path(metrics_path), Path(plots_dir)
        self.plots_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".dvclive-", dir=self.plots_dir.parent))
        self.live = Live(str(self.tmp), dvcyaml=False, save_dvc_exp=False, report=None)

    def log(self, **values: float) -> None:
        """Log one step's values (plotted) and advance the step."""
        for k, v in values.items():
            self.live.log_metric(k, float(v))
        self.live.next_step()

    def summary(self, **values) -> None:
        """Values for the metrics file only (not plotted)."""
        for k, v in values.items():
            self.live.summary[k] = v

    def close(self) -> None:
        self.live.end()
        with outputs.atomic_dir(self.plots_dir) as tmp:
            shutil.copytree(self.tmp / "plots" / "metrics", tmp, dirs_exist_ok=True)
        os.replace(self.tmp / "metrics.json", self.metrics_path)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
