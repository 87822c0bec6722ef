"""Workspaces for the tests that run the pipeline: copies of the repository, stages run in them, digests.

Shared by the end-to-end, interruption, GPU-path and SDXL tests (through the session's one reference run,
``reference_run`` in tests/conftest.py, and ``clone`` of it), and ``copy_repository`` by the benchmarks.
Importing this module changes no environment (unlike ``tests.conftest``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

STAGES = [
    "prepare_images", "generate_class_priors", "extract_poses", "train_stage1_appearance",
    "train_stage2_pose", "sample", "evaluate",
]  # fmt: skip


def copy_repository(dest: Path, root: Path = ROOT) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored files), as a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, files):
        src = root / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def stage_outputs() -> dict[str, list[str]]:
    """Each stage's declared outs, metrics and plots in dvc.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        paths = []
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(entry if isinstance(entry, str) else next(iter(entry)))
        found[name] = paths
    return found


OUTPUTS = stage_outputs()
ALL_OUTPUTS = [p for s in STAGES for p in OUTPUTS[s]]


def remove_outputs(ws: Path) -> None:
    """Delete every stage's outs, metrics and plots, and dvc.lock, so that `dvc repro` in ``ws`` runs every stage
    (the committed metrics and plots are outputs too)."""
    for paths in OUTPUTS.values():
        for p in paths:
            target = ws / p
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (ws / "dvc.lock").unlink(missing_ok=True)


def workspace(root: Path, name: str, embedded_dir: str) -> tuple[Path, dict]:
    """A copy of the repository with the test profile and no outputs, and the environment to run it in."""
    from tests.profile import apply_profile

    dest = root / name
    dest.mkdir()
    copy_repository(dest)
    params = apply_profile(yaml.safe_load((dest / "params.yaml").read_text()))
    params["generate_class_priors"]["batch_size"] = 2  # two batches, so one can be interrupted
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for paths in OUTPUTS.values():
        for p in paths:
            target = dest / p
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return dest, own_cache(root, name, embedded_dir)


def own_cache(root: Path, name: str, embedded_dir: str) -> dict:
    """The environment of a workspace with a ``POSEBOOTH_CACHE`` of its own under ``root`` (checkpoints,
    class-prior and sample caches), sharing only the session's built embedded models."""
    cache = root / f"cache-{name}"
    cache.mkdir()
    (cache / "embedded").symlink_to(embedded_dir)
    env = dict(
        os.environ, POSEBOOTH_CACHE=str(cache), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    env.pop("POSEBOOTH_FAILPOINT", None)
    return env


@dataclass(frozen=True)
class Reference:
    """The session's one `dvc repro` of the test profile: its workspace (a git repository with every output
    committed), its environment, the output of `dvc repro`, and the digests of every stage output."""

    ws: Path
    env: dict
    stdout: str
    digests: dict[str, str]


def reference(root: Path, embedded_dir: str) -> Reference:
    """`dvc repro` of a ``workspace`` under ``root``, then everything committed to git (so that copies can run
    experiments)."""
    ws, env = workspace(root, "reference", embedded_dir)
    git_init(ws, env)
    proc = subprocess.run(["dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    git_commit(ws, env, "pipeline outputs")
    return Reference(ws, env, proc.stdout, digests(ws, ALL_OUTPUTS))


def clone(ref: Reference, root: Path, name: str) -> tuple[Path, dict]:
    """A copy of the reference workspace under ``root`` (git, DVC cache, outputs) with a cache of its own: for
    tests that change what they run in. The reference itself is never changed (the session checks it)."""
    ws = root / name
    shutil.copytree(ref.ws, ws, symlinks=True)
    return ws, own_cache(root, name, os.path.realpath(Path(ref.env["POSEBOOTH_CACHE"]) / "embedded"))


def git_commit(ws: Path, env: dict, message: str) -> None:
    """Commit everything in ``ws`` (an empty commit when nothing changed)."""
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", message, "--allow-empty"]):
        subprocess.run(cmd, cwd=ws, env=env | WHO, check=True, capture_output=True)


WHO = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t.invalid"}  # fmt: skip


def git_init(ws: Path, env: dict) -> None:
    """Make ``ws`` a git repository with one commit (DVC needs one)."""
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", ws.name]):
        subprocess.run(cmd, cwd=ws, env=env | WHO, check=True, capture_output=True)


def under(key: str, paths: list[str]) -> bool:
    return any(key == p or key.startswith(p + "/") for p in paths)


def _default_sigint() -> None:
    """In the child before it starts: Ctrl-C's default. A shell starts background jobs (`make test-all &`) with
    SIGINT ignored, and Python then never turns it into KeyboardInterrupt, so an ``=INT`` failpoint would not stop
    the stage (a local slow-tier run saw exit 0 where Ctrl-C gives 130)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_stage(ws: Path, env: dict, stage: str, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env, **({"POSEBOOTH_FAILPOINT": failpoint} if failpoint else {}))
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=900, preexec_fn=_default_sigint)  # fmt: skip


def digests(ws: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under ``paths``; provenance records compared without their git revision."""
    found = {}
    for p in paths:
        target = ws / p
        files = [target] if target.is_file() else sorted(f for f in target.rglob("*") if f.is_file())
        for f in files:
            data = f.read_bytes()
            if f.name == "provenance.json":
                record = json.loads(data)
                record.pop("git", None)
                data = json.dumps(record, sort_keys=True).encode()
            found[str(f.relative_to(ws))] = hashlib.sha256(data).hexdigest()
    return found


def leftovers(ws: Path) -> list[str]:
    """Temporary files or folders of interrupted writes."""
    return sorted(
        str(p.relative_to(ws))
        for pattern in ("**/.*.tmp-*", "**/.*.live-*", "**/*.tmp.png")
        for p in ws.glob(pattern)
        if ".git" not in p.parts and ".dvc" not in p.parts
    )


def gpu_check_module():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module
