"""``common.trackers``: TensorBoard and W&B through accelerate's ``log_with``, beside dvclive (StepLog), offline."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import yaml
from PIL import Image

from posebooth import training
from posebooth.config import ConfigError
from tests.test_config import ROOT, _load

CONFIG = {"common": {"seed": 0, "trackers": ["tensorboard"]}, "train": {"lr": 1e-4, "validation_prompts": None}}


def log_a_short_run(tmp_path, trackers: list[str]):
    """Two steps and a validation image through StepLog with ``trackers``; returns the run's folder."""
    steplog = training.StepLog(tmp_path / "metrics.json", tmp_path / "plots")
    run_dir = tmp_path / "trackers" / "train_stage1_appearance" / "run"
    accelerator = training.make_accelerator("cpu", "fp32", 1, trackers, run_dir)
    steplog.track(accelerator, "train_stage1_appearance", CONFIG)
    steplog.log(loss=0.5, lr=1e-4)
    steplog.image("validation_0", 2, Image.new("RGB", (8, 6), (255, 0, 0)))
    steplog.log(loss=0.25, lr=2e-4)
    steplog.close()
    assert (tmp_path / "metrics.json").exists()  # dvclive's part unchanged
    return run_dir


def test_tensorboard_gets_loss_lr_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = log_a_short_run(tmp_path, ["tensorboard"])
    (events,) = (run_dir / "posebooth").glob("events.out.tfevents.*")  # <run>/<project>/
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(1, 0.5), (2, 0.25)]  # steps done, as images are numbered
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-4, 2e-4])
    (image,) = acc.Images("validation_0")
    assert (image.step, image.width, image.height) == (2, 8, 6)


def test_wandb_runs_offline_without_the_network(tmp_path, monkeypatch, refused_connections):
    pytest.importorskip("wandb")
    import _socket
    import socket

    refuse = socket.socket.connect  # refused_connections' (records and refuses)

    def connect(sock, address, *args):  # wandb talks to its own service process through a Unix socket
        return _socket.socket.connect(sock, address) if sock.family == socket.AF_UNIX else refuse(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default, not the environment's doing
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = log_a_short_run(tmp_path, ["wandb"])
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb"))  # the run's records, for `wandb sync` later
    assert refused_connections == []  # not even a probe


def test_unknown_or_missing_tracker_is_an_error_naming_the_key(tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["common"]["trackers"] == []  # off by default
    bad = copy.deepcopy(params)
    bad["common"]["trackers"] = ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match=r"common.trackers\[1\]: 'mlflow' is not allowed; choose one of"):
        _load(tmp_path, bad)
    bad["common"]["trackers"] = ["wandb", "wandb"]
    with pytest.raises(ConfigError, match=r"common.trackers: .* names a tracker twice"):
        _load(tmp_path, bad)
    with pytest.raises(ValueError, match=r"common.trackers: unknown tracker 'mlflow'"):
        training.check_trackers(["mlflow"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"common.trackers: wandb needs the wandb package \(pip install wandb\)"):
        training.make_accelerator("cpu", "fp32", 1, ["wandb"], tmp_path)


def test_without_trackers_nothing_is_written(tmp_path):
    run_dir = log_a_short_run(tmp_path, [])
    assert not run_dir.exists()
