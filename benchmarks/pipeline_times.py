"""Wall-clock times of the embedded pipeline as a user meets them, in a fresh copy of the repository:

1. the whole pipeline (`dvc repro` with the default params.yaml), per stage, with a fresh
   ``POSEBOOTH_CACHE`` by default, so building the embedded model and every cache is included;
2. a no-op `dvc repro` (nothing changed; median of several);
3. a sampling-only change (`sample.guidance_scale` edited, then `dvc repro`: only `sample` and
   `evaluate` may run).

Usage: ``python benchmarks/pipeline_times.py [--keep-cache] [--noop-repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.workspace import copy_repository, remove_outputs  # noqa: E402  (the tests' copy of the working tree)


def timed_repro(cwd: Path, env: dict) -> tuple[float, dict[str, float], str]:
    """Run `dvc repro`, streaming its output; return the total seconds, seconds per stage that ran, output."""
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    stages: dict[str, float] = {}
    current, since, lines = None, start, []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"Running stage '([^']+)'", line)
        if found:
            now = time.perf_counter()
            if current:
                stages[current] = now - since
            current, since = found.group(1), now
    proc.wait()
    end = time.perf_counter()
    if current:
        stages[current] = end - since
    if proc.returncode != 0:
        sys.exit("dvc repro failed:\n" + "".join(lines[-60:]))
    return end - start, stages, "".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep-cache", action="store_true", help="use $POSEBOOTH_CACHE (embedded model already built)")
    ap.add_argument("--noop-repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="posebooth-bench-"))
    ws = work / "posebooth"
    ws.mkdir()
    copy_repository(ws)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")  # fmt: skip
    if not args.keep_cache:
        env["POSEBOOTH_CACHE"] = str(work / "cache")
    who = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b.invalid", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b.invalid"}  # fmt: skip
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=ws, env=env | who, check=True, capture_output=True)
    remove_outputs(ws)  # the committed metrics and plots are outputs too: every stage runs

    total, stages, _ = timed_repro(ws, env)
    noop = []
    for _ in range(args.noop_repeats):
        t, ran, out = timed_repro(ws, env)
        assert not ran and "up to date" in out, out
        noop.append(t)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["sample"]["guidance_scale"] = float(params["sample"]["guidance_scale"]) + 0.5
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    knob, knob_stages, _ = timed_repro(ws, env)

    cache = "fresh POSEBOOTH_CACHE (the embedded model is built on first use)" if not args.keep_cache else "warm cache"
    print(f"\nembedded pipeline, default params.yaml, {cache}, {os.cpu_count()} CPU cores\n")
    print("| stage | seconds |")
    print("|---|---:|")
    for name, seconds in stages.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **whole pipeline (`dvc repro`)** | **{total:.1f}** ({total / 60:.2f} min; target < 5 min) |")
    print(f"\nno-op `dvc repro`: median {statistics.median(noop):.2f} s of {len(noop)} (target < 3 s)")
    print(f"sampling-only change (sample.guidance_scale): {knob:.1f} s, ran {list(knob_stages)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
