"""The training stages' dvclive log (posebooth.training.StepLog): curves and images written while training runs,
named for the step slider, and a metrics file without the run-dependent system figures."""

from __future__ import annotations

import json
import re
import time

import numpy as np
from PIL import Image

from posebooth.training import StepLog

# The VS Code DVC extension's MULTI_IMAGE_PATH_REG: images named <folder>/<digits>.<ext> get a step slider.
MULTI_IMAGE_PATH_REG = re.compile(r"[^/]+[/\\]\d+\.[a-z]+$", re.IGNORECASE)


def _rows(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_curves_and_images_are_readable_while_training(tmp_path):
    plots, metrics = tmp_path / "plots/train", tmp_path / "metrics/train.json"
    log = StepLog(metrics, plots, history=[{"loss": 0.9, "lr": 1e-4}])  # one step from a checkpoint
    log.log(loss=0.5, lr=1e-4)
    log.image("validation_0", 2, Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    log.log(loss=0.25, lr=5e-5)
    # Before close: every step so far is on disk, in dvclive's layout (the paths dvc.yaml declares).
    assert _rows(plots / "plots/metrics/loss.tsv") == [["step", "loss"], ["0", "0.9"], ["1", "0.5"], ["2", "0.25"]]
    assert [r[1] for r in _rows(plots / "plots/metrics/lr.tsv")[1:]] == ["0.0001", "0.0001", "5e-05"]
    (image,) = (plots / "plots/images").rglob("*.png")
    assert image.relative_to(plots).as_posix() == "plots/images/validation_0/2.png"
    assert MULTI_IMAGE_PATH_REG.search(image.as_posix())
    assert not metrics.exists()  # the metrics file is the stage's result: written once, at the end
    log.summary(steps=3, method_id=1)
    log.close()
    summary = json.loads(metrics.read_text())
    assert summary["step"] == 2 and summary["loss"] == 0.25 and summary["steps"] == 3  # step: the last row's
    assert not (plots / "metrics.json").exists()


def test_a_new_run_rewrites_the_folder(tmp_path):
    plots = tmp_path / "plots"
    (plots / "plots/images/validation_0").mkdir(parents=True)
    (plots / "plots/images/validation_0/40.png").write_bytes(b"an earlier run's image")
    log = StepLog(tmp_path / "m.json", plots)
    log.log(loss=1.0)
    log.close()
    assert not (plots / "plots/images").exists() and _rows(plots / "plots/metrics/loss.tsv")[1:] == [["0", "1.0"]]


def test_monitor_system_plots_system_figures_but_keeps_them_out_of_the_metrics(tmp_path):
    plots, metrics = tmp_path / "plots", tmp_path / "m.json"
    log = StepLog(metrics, plots, monitor_system=True)
    system = plots / "plots/metrics/system"
    deadline = time.monotonic() + 30  # dvclive aggregates 20 samples 0.05 s apart: poll for its first rows
    while not list(system.rglob("*.tsv")) and time.monotonic() < deadline:
        log.log(loss=1.0)
        time.sleep(0.2)
    assert list(system.rglob("*.tsv")), "no system figures were plotted"
    log.close()
    summary = json.loads(metrics.read_text())
    assert "system" not in summary and summary["loss"] == 1.0
