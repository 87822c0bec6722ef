"""Checkpoint folders: one per training and workspace, so queued experiments never share one (issue 18)."""

from __future__ import annotations

import os
from pathlib import Path

from posebooth import checkpoints


def test_equal_trainings_in_two_workspaces_get_two_checkpoint_folders(tmp_path, monkeypatch):
    """Two queued experiments (each in its own `.dvc/tmp/exps/` workspace) with equal params and inputs get
    folders of their own; a re-run in the same workspace, reached by any path, finds its folder again."""
    exps = tmp_path / "repo" / ".dvc" / "tmp" / "exps"
    a, b = exps / "tmpa", exps / "tmpb"
    for ws in (a, b):
        (ws / "data").mkdir(parents=True)
        (ws / "data" / "photo.png").write_bytes(b"the same bytes")
        (ws / "params.yaml").write_text("train: {lr: 0.0001}\n")
    (tmp_path / "link").symlink_to(a)

    def folder(ws: Path) -> Path:
        monkeypatch.chdir(ws)  # a stage runs in its workspace, with paths relative to it (as in dvc.yaml)
        key = checkpoints.fingerprint({"train": {"lr": 1e-4}}, ["data"])
        return checkpoints.checkpoint_dir("train_stage1_appearance", key)

    assert folder(a) != folder(b)
    assert folder(a) == folder(a) == folder(tmp_path / "link")
    cache = Path(os.environ["POSEBOOTH_CACHE"]) / "checkpoints" / "train_stage1_appearance"
    assert folder(a).parent == folder(b).parent == cache
    assert checkpoints.per_workspace("k", a) != checkpoints.per_workspace("k", b)  # the sample stage's cache key
    assert checkpoints.per_workspace("k", a) != checkpoints.per_workspace("j", a)
