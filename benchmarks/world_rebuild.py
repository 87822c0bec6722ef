"""Does a rebuilt world work like the committed one? Issue 16's check of `make world` across machines.

The world's base model is bit-for-bit repeatable on one machine, not across CPUs (the README's world section),
so a rebuild elsewhere is judged by what it does. Build the parts, then compare:

    posebooth world pretrain --out /tmp/rebuilt --parts base,controlnet     # in a clone: make world
    python benchmarks/world_rebuild.py /tmp/rebuilt [--keep DIR]

First, per weights file of each rebuilt part: byte-identical to the committed file or not, the largest weight
difference and the VAE's scaling factor. Then the default pipeline (`dvc repro`, committed params) in a copy of
the repository whose world/ holds the rebuilt parts, and its figures beside the committed
metrics/evaluate.json's. The tolerance, as the README states it: the rebuilt world must make the same claims
true as the committed one, with the regression guard's margins (tests/test_world_guard.py) and issue 16's met
bars; a figure's change is shown against both 95 % intervals, for reading, not as a pass mark (two builds
are two draws of a chaotic training run). Exit status 1 when a claim fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from posebooth.world.build import FOLDERS  # noqa: E402
from tests.test_world_guard import DINO_MARGIN, PCK_MARGIN, STAGE2_SLACK  # noqa: E402  (the guard's margins)
from tests.workspace import copy_repository, git_init, remove_outputs  # noqa: E402

PARTS = ("base", "controlnet")
PCK_BAR, PRES_SLACK = 0.85, 0.1  # issue 16's bars that the committed world meets


def compare_weights(rebuilt: Path, committed: Path) -> list[tuple[str, bool, float]]:
    """(file, byte-identical, largest absolute weight difference) for every safetensors file of a part."""
    from safetensors.torch import load_file

    rows = []
    files = sorted(committed.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{committed}: no committed weights to compare with")
    for ours in files:
        theirs = rebuilt / ours.relative_to(committed)
        if not theirs.is_file():
            raise FileNotFoundError(f"{theirs}: missing from the rebuilt world (build its part first)")
        same = ours.read_bytes() == theirs.read_bytes()
        a, b = load_file(ours), load_file(theirs)
        diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)
        rows.append((str(ours.relative_to(committed.parent)), same, diff))
    return rows


def scaling_factor(folder: Path) -> float:
    return json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]


def run_pipeline(ws: Path, rebuilt: Path, parts: tuple[str, ...]) -> dict:
    """metrics/evaluate.json of `dvc repro` in a copy of the repository under ``ws`` with ``parts`` rebuilt."""
    copy_repository(ws)
    remove_outputs(ws)
    for part in parts:
        shutil.rmtree(ws / "world" / FOLDERS[part])
        shutil.copytree(rebuilt / FOLDERS[part], ws / "world" / FOLDERS[part])
        shutil.copy2(rebuilt / "records" / f"{part}.json", ws / "world" / "records" / f"{part}.json")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    git_init(ws, env)
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dvc repro failed in {ws}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    print(f"dvc repro on the rebuilt world: {time.perf_counter() - start:.0f} s")
    return json.loads((ws / "metrics" / "evaluate.json").read_text())


FIGURES = {  # name: path in metrics/evaluate.json
    "DINO, pose-free subject samples": ("pose_free", "dino"),
    "DINO, base model (no identifier)": ("base_model", "dino"),
    "verification, pose-free": ("pose_free", "verified"),
    "context accuracy, pose-free": ("pose_free", "context_accuracy"),
    "PRES (DINO)": ("pres",),
    "PRES verification": ("pres_verification",),
    "PRES verification, base model": ("base_model", "pres_verification"),
    "PCK@0.2, stage-2 ControlNet": ("pose_adherence", "pck_0.2"),
    "PCK@0.2, pretrained ControlNet": ("pretrained_controlnet", "pose_adherence", "pck_0.2"),
    "PCK@0.2, pose-free against targets": ("unposed_against_targets", "pck_0.2"),
    "DINO, posed samples": ("posed", "dino"),
    "verification, posed": ("posed", "verified"),
}


def figure(metrics: dict, path: tuple[str, ...]) -> dict:
    """{mean, ci_low, ci_high} at ``path`` (pose figures are flat: ``pck_0.2`` beside ``pck_0.2_ci_low``)."""
    parent = metrics
    for key in path[:-1]:
        parent = parent[key]
    value = parent[path[-1]]
    if isinstance(value, dict):
        return value
    return {"mean": value, "ci_low": parent.get(f"{path[-1]}_ci_low"), "ci_high": parent.get(f"{path[-1]}_ci_high")}


def interval(f: dict) -> str:
    return f"{f['mean']:.3f}" + ("" if f["ci_low"] is None else f" [{f['ci_low']:.3f}, {f['ci_high']:.3f}]")


def within(f: dict, g: dict) -> bool:
    """Whether ``g``'s mean lies in ``f``'s interval."""
    return f["ci_low"] <= g["mean"] <= f["ci_high"]


def claims(m: dict) -> dict[str, bool]:
    """The regression guard's claims (its margins) and issue 16's met bars, on one run's metrics."""
    pck = figure(m, FIGURES["PCK@0.2, stage-2 ControlNet"])["mean"]
    return {
        f"stage 1 learns the subject: DINO > base + {DINO_MARGIN}":
            m["pose_free"]["dino"]["mean"] > m["base_model"]["dino"]["mean"] + DINO_MARGIN,
        f"poses followed: PCK >= pose-free + {PCK_MARGIN}":
            pck >= figure(m, FIGURES["PCK@0.2, pose-free against targets"])["mean"] + PCK_MARGIN,
        f"stage 2 >= pretrained ControlNet - {STAGE2_SLACK}":
            pck >= figure(m, FIGURES["PCK@0.2, pretrained ControlNet"])["mean"] - STAGE2_SLACK,
        f"issue 16: PCK@0.2 >= {PCK_BAR}": pck >= PCK_BAR,
        f"issue 16: PRES verification <= base + {PRES_SLACK}":
            m["pres_verification"]["mean"] <= m["base_model"]["pres_verification"]["mean"] + PRES_SLACK,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rebuilt", type=Path, help="the folder `posebooth world pretrain --out` wrote")
    parser.add_argument("--parts", default=",".join(PARTS), help="the rebuilt parts to use (default: %(default)s)")
    parser.add_argument("--keep", type=Path, help="run the pipeline here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    parts = tuple(args.parts.split(","))

    print("| file | byte-identical | largest weight difference |\n|---|---|---|")
    folders = [FOLDERS[p] for p in parts]
    for name, same, diff in [r for f in folders for r in compare_weights(args.rebuilt / f, ROOT / "world" / f)]:
        print(f"| {name} | {'yes' if same else 'no'} | {diff:.4g} |")
    if "base" in parts:
        print(f"VAE scaling factor: committed {scaling_factor(ROOT / 'world' / 'base'):.4f}, "
              f"rebuilt {scaling_factor(args.rebuilt / 'base'):.4f}")  # fmt: skip
    for part in parts:
        record = json.loads((args.rebuilt / "records" / f"{part}.json").read_text())
        print(f"rebuilt {part}: {record['seconds'] / 60:.1f} min on {record.get('machine', 'an unrecorded machine')}")

    ws = args.keep or Path(tempfile.mkdtemp(prefix="world_rebuild_"))
    ws.mkdir(parents=True, exist_ok=True)
    rebuilt = run_pipeline(ws, args.rebuilt, parts)
    committed = json.loads((ROOT / "metrics" / "evaluate.json").read_text())
    print("\n| figure | committed world | rebuilt world | change | within both intervals |\n|---|---|---|---|---|")
    for name, path in FIGURES.items():
        a, b = figure(committed, path), figure(rebuilt, path)
        inside = "" if a["ci_low"] is None else "yes" if within(a, b) and within(b, a) else "no"
        print(f"| {name} | {interval(a)} | {interval(b)} | {b['mean'] - a['mean']:+.3f} | {inside} |")
    print("\n| claim | committed world | rebuilt world |\n|---|---|---|")
    ours, theirs = claims(committed), claims(rebuilt)
    for name in ours:
        print(f"| {name} | {'holds' if ours[name] else 'FAILS'} | {'holds' if theirs[name] else 'FAILS'} |")
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
    return 0 if all(theirs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
