"""Interrupted stages and repeated runs: nothing half-written, resumed runs and repeated runs bit-identical.

Three copies of the repository run the embedded pipeline with the small test profile:

- R, the reference: every stage once, in order, exactly as dvc.yaml runs it (``python -m stages.<name>``);
- D: `dvc repro` in a git repository with its own cache; every output must equal R's, file by file;
- K: every stage is first stopped (SIGKILL, SIGTERM or SIGINT, sent at a named point through
  ``POSEBOOTH_FAILPOINT``) and then run again; a stopped stage leaves no output that looks finished, the
  re-run resumes where that makes sense and ends with R's files.

Each copy has its own ``POSEBOOTH_CACHE`` (checkpoints, class-prior and sample caches), sharing only the
session's embedded model, so no copy resumes from another's work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posebooth import outputs
from tests.workspace import OUTPUTS, STAGES, digests, git_init, leftovers, run_stage, under, workspace

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd) -> tuple[Path, dict, dict]:
    """R: every stage once, in order, uninterrupted; with the digests of all outputs."""
    from posebooth import embedded

    root = tmp_path_factory.mktemp("interruptions")
    ws, env = workspace(root, "R", str(embedded.cache_root()))
    for stage in STAGES:
        proc = run_stage(ws, env, stage)
        assert proc.returncode == 0, f"{stage}:\n{proc.stderr[-3000:]}"
    all_outputs = [p for s in STAGES for p in OUTPUTS[s]]
    assert not leftovers(ws)
    return ws, env, digests(ws, all_outputs)


def test_two_full_runs_are_bit_identical(reference, tmp_path):
    """`dvc repro` in another copy (its own caches) gives every output file of R bit for bit: adapter weights,
    images, pose maps, plots and metrics."""
    from posebooth import embedded

    r_ws, _, expected = reference
    ws, env = workspace(tmp_path, "D", str(embedded.cache_root()))
    git_init(ws, env)
    proc = subprocess.run(["dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = digests(ws, [p for s in STAGES for p in OUTPUTS[s]])
    assert sorted(got) == sorted(expected)
    assert any(k.endswith(".safetensors") for k in got) and sum(k.endswith(".png") for k in got) > 20
    differ = [k for k in expected if got[k] != expected[k]]
    assert not differ, f"differ between two runs with the same seed: {differ}"


def test_every_stage_stopped_then_rerun_ends_as_an_uninterrupted_run(reference, tmp_path):
    from posebooth import embedded

    _, _, expected = reference
    ws, env = workspace(tmp_path, "K", str(embedded.cache_root()))
    for stage in STAGES:
        for _stage, point, code, resumed in (k for k in KILLS if k[0] == stage):
            stopped = run_stage(ws, env, stage, failpoint=point)
            assert stopped.returncode == code, f"{point}: exit {stopped.returncode}\n{stopped.stderr[-3000:]}"
            for path in OUTPUTS[stage]:  # absent, or complete (the same as the uninterrupted run's)
                now = digests(ws, [path])
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


def test_a_stray_stage_holds_its_lock(reference, tmp_path):
    """Killing only `dvc` leaves its stage running; a second copy of the stage refuses to start beside it
    and writes nothing; once the process group is killed, `dvc repro` runs the stage again."""
    from posebooth import embedded

    ws, env = workspace(tmp_path, "L", str(embedded.cache_root()))
    git_init(ws, env)
    for stage in STAGES[:3]:
        assert run_stage(ws, env, stage).returncode == 0
    dvc = subprocess.Popen(["dvc", "repro", "-s", "train_stage1_appearance"], cwd=ws, env=env,
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
    again = subprocess.run(["dvc", "repro", "-s", "train_stage1_appearance"], cwd=ws, env=env, capture_output=True,
                           text=True, timeout=900)  # fmt: skip
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


def test_generation_stages_load_their_models_once(reference, tmp_path):
    """Class priors and sampling load the base model once per stage, however many batches they make (4 and 4
    here, nothing cached), and give R's files."""
    ws, env, expected = reference
    cache = tmp_path / "cache"  # nothing cached but the embedded model: every batch is made
    cache.mkdir()
    (cache / "embedded").symlink_to(Path(env["POSEBOOTH_CACHE"]) / "embedded")
    proc = subprocess.run([sys.executable, "-c", LOAD_COUNTER], cwd=ws, env=dict(env, POSEBOOTH_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loads = json.loads(proc.stdout.split("LOADS=")[-1])
    assert loads == {"stages.generate_class_priors": 1, "stages.sample": 1}
    assert "0 of 4 class image(s) found in the cache" in proc.stderr
    for out, original in (("data/priors_again", "data/class_priors"), ("samples_again", "samples")):
        again = {k.replace(out, original, 1): v for k, v in digests(ws, [out]).items()}
        assert len(again) > 3 and all(expected[k] == v for k, v in again.items()), out
