"""What a stage checks before it writes: outputs inside the repository, one copy at a time, free disk space."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from posebooth import outputs
from tests.conftest import ROOT
from tests.profile import apply_profile


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with params.yaml (test profile) and the subject photos, as the current directory."""
    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "data" / "subject", ws / "data" / "subject")
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(ws)
    return ws


def _run_stage(monkeypatch, stage, *args):
    monkeypatch.setattr(sys, "argv", [stage.__name__, *args])
    stage.main()


def test_outputs_must_stay_inside_the_repository(workspace, tmp_path, monkeypatch):
    from stages import prepare_images

    outside = tmp_path / "elsewhere"
    with pytest.raises(ValueError, match=r"prepare_images: the output path '\.\./elsewhere' resolves to .*outside"):
        _run_stage(monkeypatch, prepare_images, "--out", "../elsewhere")
    with pytest.raises(ValueError, match=r"the output path '/"):
        _run_stage(monkeypatch, prepare_images, "--metrics", str(outside / "m.json"))
    (workspace / "linked").symlink_to(outside, target_is_directory=True)  # a symlink that leaves it
    outside.mkdir()
    with pytest.raises(ValueError, match=r"'linked/prepared' resolves to"):
        _run_stage(monkeypatch, prepare_images, "--out", "linked/prepared")
    assert not any(outside.iterdir()) and not (workspace / "data" / "prepared").exists()


def test_inputs_may_live_anywhere(workspace, tmp_path, monkeypatch):
    """Photos outside the repository are fine (only outputs are confined); they are read, not changed."""
    from stages import prepare_images

    photos = tmp_path / "my photos"
    shutil.copytree(workspace / "data" / "subject", photos)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["prepare_images"]["input_dir"] = str(photos)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    _run_stage(monkeypatch, prepare_images)
    assert len(list((workspace / "data/prepared/images").glob("*.png"))) == 6
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_a_second_copy_of_a_stage_refuses_to_start(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from posebooth import outputs; "
         "outputs.claim('sample', root=sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            outputs.StageBusy, match=rf"sample: another copy is still running in .* \(pid {holder.pid},"
        ):
            outputs.claim("sample", root=tmp_path)
        outputs.claim("evaluate", root=tmp_path)  # other stages are not blocked
        outputs.claim("sample", root=tmp_path / "other")  # nor the same stage in another workspace
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    while True:  # the kernel drops a killed holder's lock
        try:
            outputs.claim("sample", root=tmp_path)
            break
        except outputs.StageBusy:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_stale_temporary_folders_are_removed_only_under_the_lock(tmp_path, monkeypatch):
    stale = tmp_path / ".prepared.tmp-abc123"
    stale.mkdir()
    (stale / "half.png").write_bytes(b"x")
    monkeypatch.setattr(outputs, "_LOCKS", {})
    with outputs.atomic_dir(tmp_path / "prepared") as tmp:  # no lock: another run may own it, so it stays
        (tmp / "a").write_text("a")
    assert stale.exists()
    outputs.claim("prepare_images", root=tmp_path)
    with outputs.atomic_dir(tmp_path / "prepared") as tmp:
        (tmp / "b").write_text("b")
    assert not stale.exists() and sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["b"]


Usage = namedtuple("Usage", "total used free")


def _disk_full_in(monkeypatch, *folders: Path) -> list[Path]:
    """``shutil.disk_usage`` that reports 1 MB free for ``folders`` and paths inside them, 1 TB anywhere else
    (the current directory, /tmp); returns the list of the paths it was asked about."""
    full = [Path(f).resolve() for f in folders]
    asked = []

    def usage(path):
        path = Path(path).resolve()
        asked.append(path)
        return Usage(10**12, 0, 2**20 if any(path.is_relative_to(f) for f in full) else 10**12)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


def test_free_space_is_checked_per_file_system(tmp_path, monkeypatch):
    seen = []

    def usage(path):
        seen.append(Path(path))
        return Usage(10**12, 0, 100 * 2**20 if Path(path) == tmp_path else 10**12)  # 100 MB free in tmp_path only

    monkeypatch.setattr(shutil, "disk_usage", usage)
    outputs.require_free_space({tmp_path / "a": 40 * 2**20, tmp_path / "b/c/d": 30 * 2**20}, "s")  # 70 MB + margin
    assert seen == [tmp_path]  # one file system, looked up once, through the nearest existing folder
    # 85 MB * 1.05 + 16 MB = 105 MB > 100 MB: only a check of tmp_path itself sees the shortage.
    with pytest.raises(
        OSError, match=rf"s: not enough free disk space in {re.escape(str(tmp_path))}: about 105 MB needed, 100 MB free"
    ):
        outputs.require_free_space({tmp_path / "a": 40 * 2**20, tmp_path / "b": 45 * 2**20}, "s")
    assert seen == [tmp_path, tmp_path]


def test_a_full_disk_stops_stages_before_they_write(workspace, tmp_path, monkeypatch):
    from stages import generate_class_priors, prepare_images

    data = (workspace / "data").resolve()  # the nearest existing folder of data/prepared and data/class_priors
    asked = _disk_full_in(monkeypatch, data)
    with pytest.raises(
        OSError,
        match=rf"prepare_images: not enough free disk space in {re.escape(str(data))}: .* nothing has been written",
    ):
        _run_stage(monkeypatch, prepare_images)
    assert asked == [data]
    assert not (workspace / "data" / "prepared").exists() and not (workspace / "metrics").exists()
    asked = _disk_full_in(monkeypatch, tmp_path / "another_disk")  # full elsewhere: the stage writes
    _run_stage(monkeypatch, prepare_images)
    assert asked == [data] and (workspace / "data" / "prepared").is_dir()

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["common"]["seed"] = 4242  # nothing of this seed in the session's class-prior cache
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    cache = Path(os.environ["POSEBOOTH_CACHE"]).resolve()  # generated images go to the cache, then to data/
    asked = _disk_full_in(monkeypatch, cache, data)
    with pytest.raises(OSError, match=r"generate_class_priors: not enough free disk space"):
        _run_stage(monkeypatch, generate_class_priors)
    assert asked and all(p.is_relative_to(cache) or p == data for p in asked)
    assert not (workspace / "data" / "class_priors").exists()


def test_seed_everything_deterministic_switch(monkeypatch):
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        outputs.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
