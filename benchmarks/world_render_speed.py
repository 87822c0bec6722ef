"""Render speed of the procedural world (``posebooth.world``): milliseconds per scene on one core, overall,
per class and per context, and what that makes 100,000 renders. The target is under 5 ms a 64 px scene
on average, so that a pretraining set of 100k scenes renders in minutes.

Times the whole of ``render`` (background, subject, LANCZOS downsample, noise, keypoint validation) on a
seeded stream of scenes after a warm-up, in this process's CPU time (the wall clock is printed too: on a
shared machine it also counts other jobs' turns). Usage:
``python benchmarks/world_render_speed.py [--scenes 2000] [--size 64] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posebooth.world import iter_scenes, render  # noqa: E402

TARGET_MS = 5.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()

    for scene in iter_scenes(args.seed + 1, args.warmup):
        render(scene, args.size)
    times: dict[str, list[float]] = defaultdict(list)  # CPU ms per render, by "all", class and context
    start, cpu_start = time.perf_counter(), time.process_time()
    for scene in iter_scenes(args.seed, args.scenes):
        t = time.process_time()  # CPU time: on a shared machine wall time also counts other jobs' turns
        render(scene, args.size)
        ms = (time.process_time() - t) * 1e3
        times["all"].append(ms)
        times[scene.subject.kind].append(ms)
        times[scene.context].append(ms)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    print(f"{args.scenes} scenes at {args.size} px: {wall:.1f} s wall clock, {cpu:.1f} s CPU (sampling included)")
    print(f"wall clock per render (other processes' load included): {wall / args.scenes * 1e3:.2f} ms")
    print("CPU time per render:")
    print("| scenes | n | mean ms | median ms | p95 ms |")
    print("|---|---|---|---|---|")
    for key, values in sorted(times.items(), key=lambda kv: (kv[0] != "all", -statistics.fmean(kv[1]))):
        p95 = sorted(values)[int(0.95 * (len(values) - 1))]
        print(
            f"| {key} | {len(values)} | {statistics.fmean(values):.2f} | {statistics.median(values):.2f} | {p95:.2f} |"
        )
    mean = statistics.fmean(times["all"])
    verdict = "within" if mean < TARGET_MS else "OVER"
    print(
        f"mean {mean:.2f} ms CPU per render: {verdict} the {TARGET_MS:g} ms target; 100,000 renders take about "
        f"{mean * 100:.0f} s on one core"
    )


if __name__ == "__main__":
    main()
