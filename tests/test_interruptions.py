"""Interrupted stages and repeated runs: nothing half-written, resumed runs and repeated runs bit-identical.

Against the session's reference run (``reference_run``: `dvc repro` of the small test profile, in its own copy of
the repository with its own cache), another copy K runs every stage as dvc.yaml runs it (``python -m
stages.<name>``), each first stopped (SIGKILL, SIGTERM or SIGINT, sent at a named point through
``POSEBOOTH_FAILPOINT``) and then run again: a stopped stage leaves no output that looks finished, the re-run
resumes where that makes sense, and every output file ends equal to the reference run's, bit for bit (so two
runs with the same seed give the same adapter weights, images, pose maps, plots and metrics).

Each copy has its own ``POSEBOOTH_CACHE`` (checkpoints, class-prior and sample caches), sharing only the
session's embedded model, so no copy resumes from another's work.
"""

from __future__ import annotations

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

from posebooth import outputs
from tests.workspace import OUTPUTS, STAGES, clone, digests, leftovers, run_stage, under, workspace

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reference")]

# dvclive writes the training stages' plots folders as training runs (issue 18), so a stop leaves them partial.
LIVE = {"plots/train_stage1_appearance", "plots/train_stage2_pose"}

KILLS = [  # (stage, failpoint, exit code, log line the re-run must print)
    ("prepare_images", "before-rename:prepared=TERM", 128 + signal.SIGTERM, None),
    ("prepare_images", "after-rename:prepared", -signal.SIGKILL, None),
    ("generate_class_priors", "class-priors:batch", -signal.SIGKILL, "2 of 4 class image(s) found in the cache"),
    ("generate_class_priors", "before-rename:class_priors", -signal.SIGKILL, "4 of 4 class image(s) found"),
    ("extract_poses", "before-rename:poses=INT", 130, None),
    ("train_stage1_appearance", "checkpoint-saved", -signal.SIGKILL, "resuming lora from the checkpoint after step 3"),
    ("train_stage1_appearance", "before-rename:stage1", -signal.SIGKILL, "checkpoint after step 3"),
    ("train_stage2_pose", "checkpoint-saved=TERM", 128 + signal.SIGTERM, "resuming from the checkpoint after step 2"),
    ("train_stage2_pose", "before-rename:stage2", -signal.SIGKILL, None),
    ("sample", "sample:batch@3", -signal.SIGKILL, "3 of 4 batch(es) were made before an interruption"),
    ("sample", "before-rename:samples", -signal.SIGKILL, "4 of 4 batch(es)"),
    ("evaluate", "evaluate:metrics-written", -signal.SIGKILL, None),
]


def test_every_stage_stopped_then_rerun_ends_as_an_uninterrupted_run(reference_run, tmp_path):
    from posebooth import embedded

    expected = reference_run.digests
    assert any(k.endswith(".safetensors") for k in expected) and sum(k.endswith(".png") for k in expected) > 20
    ws, env = workspace(tmp_path, "K", str(embedded.cache_root()))
    for stage in STAGES:
        for _stage, point, code, resumed in (k for k in KILLS if k[0] == stage):
            stopped = run_stage(ws, env, stage, failpoint=point)
            assert stopped.returncode == code, f"{point}: exit {stopped.returncode}\n{stopped.stderr[-3000:]}"
            for path in OUTPUTS[stage]:  # absent, or complete (the same as the uninterrupted run's)
                now = digests(ws, [path])
                if path in LIVE:  # the curve so far: each file the start of the uninterrupted run's, images equal
                    for k in now:
                        if k.endswith(".tsv"):
                            so_far, whole = (ws / k).read_text(), (reference_run.ws / k).read_text()
                            assert whole.startswith(so_far), f"{point}: {k} is not the uninterrupted curve's start"
                        elif k.endswith(".png"):
                            assert now[k] == expected[k], f"{point}: {k} differs"
                    continue
                assert all(now[k] == expected[k] for k in now), f"{point}: {path} is half-written"
            if code != -signal.SIGKILL:  # SIGINT and SIGTERM unwind: their temporary files are gone at once
                assert not leftovers(ws), f"{point}: {leftovers(ws)}"
            again = run_stage(ws, env, stage)
            assert again.returncode == 0, f"re-run after {point}:\n{again.stderr[-3000:]}"
            if resumed:
                assert resumed in again.stderr, f"re-run after {point} did not resume:\n{again.stderr[-3000:]}"
            got = digests(ws, OUTPUTS[stage])
            want = {k: v for k, v in expected.items() if under(k, OUTPUTS[stage])}
            assert got == want, f"after {point} and a re-run, {[k for k in want if got.get(k) != want[k]]} differ"
            assert not leftovers(ws), f"{point}: the re-run left {leftovers(ws)}"
        assert stage in {k[0] for k in KILLS}, f"no interruption tested for {stage}"
    cache = Path(env["POSEBOOTH_CACHE"])
    assert not list((cache / "checkpoints").rglob("state.json")), "finished trainings leave no checkpoint"
    assert not any((cache / "samples").glob("*/*.png")), "a finished sample stage removes its batch cache"

    # The GPU determinism switch changes nothing on CPU (already deterministic) and runs every op there.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["common"]["deterministic"] = True
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    det = run_stage(
        ws, env, "train_stage1_appearance", "--out", "models/det", "--metrics", "det.json", "--plots", "det"
    )
    assert det.returncode == 0, det.stderr[-3000:]
    weights = "pytorch_lora_weights.safetensors"
    assert (ws / "models/det" / weights).read_bytes() == (ws / "models/stage1" / weights).read_bytes()


def test_a_stray_stage_holds_its_lock(reference_run, tmp_path):
    """Killing only `dvc` leaves its stage running; a second copy of the stage refuses to start beside it
    and writes nothing; once the process group is killed, `dvc repro` runs the stage again."""
    ws, env = clone(reference_run, tmp_path, "L")
    for path in OUTPUTS["train_stage1_appearance"]:  # the stage has not run here (and the run cache is not used)
        target = ws / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    repro = ["dvc", "repro", "--no-run-cache", "-s", "train_stage1_appearance"]
    dvc = subprocess.Popen(repro, cwd=ws, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    lock = outputs.lock_path("train_stage1_appearance", ws)
    deadline = time.monotonic() + 300
    while not _holder(lock):
        assert dvc.poll() is None, "dvc ended before its stage took the lock"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stray = _holder(lock)
    os.kill(stray, signal.SIGSTOP)  # keep it mid-run (it would otherwise finish while we look)
    try:
        dvc.kill()  # only dvc, as an impatient user or a CI timeout would
        dvc.wait(timeout=60)
        os.kill(stray, 0)  # the stage is still there
        second = run_stage(ws, env, "train_stage1_appearance")
        assert second.returncode == 1
        assert f"another copy is still running in {ws.resolve()} (pid {stray}" in second.stderr
        assert not (ws / "models/stage1").exists() and not (ws / "metrics/train_stage1_appearance.json").exists()
    finally:
        os.killpg(dvc.pid, signal.SIGKILL)  # the whole process group
    deadline = time.monotonic() + 60
    while _holder(lock):  # the kernel drops the lock with the process
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = subprocess.run(repro, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (ws / "models/stage1/pytorch_lora_weights.safetensors").exists() and not leftovers(ws)


def _holder(lock: Path) -> int | None:
    """The live process that wrote its pid into ``lock`` (taking the lock), without touching the lock."""
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


LOAD_COUNTER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from stages import generate_class_priors, sample
counts = {}
for stage, args in ((generate_class_priors, ["--out", "data/priors_again"]),
                    (sample, ["--out", "samples_again", "--grid", "plots/grid_again.png"])):
    real = stage.load_components
    def counted(*a, real=real, name=stage.__name__, **k):
        counts[name] = counts.get(name, 0) + 1
        return real(*a, **k)
    stage.load_components = counted
    sys.argv = [stage.__name__, *args]
    stage.main()
print("LOADS=" + json.dumps(counts))
"""


def test_generation_stages_load_their_models_once(reference_run, tmp_path):
    """Class priors and sampling load the base model once per stage, however many batches they make (4 and 4
    here, nothing cached), and give the reference run's files."""
    expected = reference_run.digests
    ws, env = clone(reference_run, tmp_path, "once")  # its own cache: nothing cached, every batch is made
    proc = subprocess.run([sys.executable, "-c", LOAD_COUNTER], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loads = json.loads(proc.stdout.split("LOADS=")[-1])
    assert loads == {"stages.generate_class_priors": 1, "stages.sample": 1}
    assert "0 of 4 class image(s) found in the cache" in proc.stderr
    for out, original in (("data/priors_again", "data/class_priors"), ("samples_again", "samples")):
        again = {k.replace(out, original, 1): v for k, v in digests(ws, [out]).items()}
        assert len(again) > 3 and all(expected[k] == v for k, v in again.items()), out
