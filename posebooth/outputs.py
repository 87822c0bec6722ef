"""Writing stage outputs the DVC way: complete or not at all (temporary path, then rename).

A stage first ``claim``s its outputs: they must lie inside the repository (where DVC tracks them), and a
lock held until the process ends (an ``flock``, which the kernel drops even on SIGKILL) stops a second
copy of the stage from writing beside a stray one, such as a stage process left running when only
``dvc`` was killed. Temporary folders left behind by a killed run are removed by the next one, under the
lock. ``require_free_space`` stops a stage before it writes large outputs to a full disk, and
``failpoint`` lets the tests kill a stage (SIGKILL) at a named point to prove it resumes correctly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


_LOCKS: dict[Path, int] = {}  # lock file -> its open descriptor, held until the process exits
_HITS: dict[str, int] = {}  # failpoint name -> times reached


class StageBusy(OSError):
    """Another copy of the stage is still running in this workspace."""


def claim(stage: str, *outs: str | Path, root: str | Path = ".") -> None:
    """Check that the stage's outputs ``outs`` stay inside the repository ``root`` and take the stage's
    lock (held until the process exits); raise with what to do when either fails."""
    root = Path(root).resolve()
    for out in outs:
        resolved = (root / out).resolve()
        if resolved != root and root not in resolved.parents:
            raise ValueError(
                f"{stage}: the output path {str(out)!r} resolves to {resolved}, outside the repository {root}; "
                "outputs must stay inside it, where DVC tracks them (inputs such as photos and model folders "
                "may live anywhere)"
            )
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return  # under `accelerate launch`, the first process of each machine holds the lock for all
    lock = lock_path(stage, root)
    if lock in _LOCKS:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StageBusy(
            f"{stage}: another copy is still running in {root} (pid {holder}, lock {lock}); a stopped `dvc` can "
            f"leave its stage running. Wait for it, or stop it with `kill -- -$(ps -o pgid= {holder})`, then re-run"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS[lock] = fd


def lock_path(stage: str, root: str | Path = ".") -> Path:
    """The lock file of ``stage`` in the workspace ``root`` (outside it, so that git and DVC never see it)."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "posebooth-locks" / f"{key}-{stage}.lock"


def failpoint(name: str) -> None:
    """Send this process a signal when ``POSEBOOTH_FAILPOINT`` is ``name[@N][=SIGNAL]``: at the Nth time
    (default 1) this point is reached, SIGNAL (default KILL; INT, TERM) arrives. The tests' way to interrupt
    a stage at an exact place; a no-op otherwise."""
    wanted = os.environ.get("POSEBOOTH_FAILPOINT")
    if not wanted:
        return
    point, _, sig = wanted.partition("=")
    target, _, nth = point.partition("@")
    if target != name:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def remove_stale(path: Path, tag: str = "tmp") -> None:
    """Remove temporary siblings of ``path`` (``.<name>.<tag>-*``) that a killed run left, when this process
    holds a stage lock (so no live copy of the stage can be writing them)."""
    if not _LOCKS:
        return
    for stale in path.parent.glob(f".{path.name}.{tag}-*"):
        log.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        failpoint(f"before-rename:{path.name}")
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.rename(tmp, path)
        failpoint(f"after-rename:{path.name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nbytes(*things) -> int:
    """Bytes of the tensors given, or of the parameters and buffers of the modules given."""
    total = 0
    for thing in things:
        if isinstance(thing, torch.nn.Module):
            tensors = [*thing.parameters(), *thing.buffers()]
        elif isinstance(thing, torch.Tensor):
            tensors = [thing]
        else:
            tensors = list(thing)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def require_free_space(needs: dict[str | Path, int], stage: str) -> None:
    """Stop before writing when a folder's file system has less free space than the bytes ``needs`` gives
    for it (plus a 5 % and 16 MB margin); folders on one file system add up."""
    by_device: dict[int, tuple[Path, int]] = {}
    for folder, size in needs.items():
        existing = Path(folder).resolve()
        while not existing.exists():
            existing = existing.parent
        dev = existing.stat().st_dev
        known = by_device.get(dev, (existing, 0))
        by_device[dev] = (known[0], known[1] + int(size))
    for where, size in by_device.values():
        need = int(size * 1.05) + 16 * 2**20
        free = shutil.disk_usage(where).free
        if free < need:
            raise OSError(
                f"{stage}: not enough free disk space in {where}: about {need / 2**20:,.0f} MB needed, "
                f"{free / 2**20:,.0f} MB free. Free some space (or point POSEBOOTH_CACHE, where checkpoints and "
                "caches go, at a larger disk) and run again; nothing has been written"
            )


def _normal_permissions(root: Path) -> None:
    """mkdtemp and some writers create private (0700/0600) paths: give outputs the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested keys joined with dots, as `dvc exp show` and `dvc metrics diff` name their columns."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_metric_value(value) -> bool:
    """A number or None: what a DVC metrics file holds (a boolean shows as the text True/False, so it is not)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def check_metrics(data: dict, where: str | Path) -> None:
    """Raise unless every value of ``data`` (nested keys flattened) is a number or None: `dvc exp show` makes a
    column of each key, and a string where another experiment has a number breaks the column."""
    bad = {k: v for k, v in flatten(data).items() if not is_metric_value(v)}
    if bad:
        raise ValueError(
            f"{where}: metrics must be numbers or null, got {bad}; descriptive values (names, sources, why a "
            "figure is missing) go to a non-metric file beside the metrics"
        )


def write_metrics(path: str | Path, data: dict) -> None:
    """Write a DVC metrics file atomically, after ``check_metrics``."""
    check_metrics(data, path)
    write_json(path, data)


def save_image(path: str | Path, image) -> None:
    """Save a PIL image atomically (temporary file in the same folder, then rename); the format follows
    ``path``'s suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path):
    """Read a JSON file written by an upstream stage; the error names it and the stage to re-run."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the upstream stage first (dvc repro)")
    return json.loads(path.read_text())


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit use.

    CPU runs are bit-identical for a seed as they are. On a GPU, cuDNN's autotuner and atomic-add kernels
    vary between runs; ``deterministic`` (``common.deterministic``) makes torch use deterministic kernels
    only (slower; an op without one raises), turns the autotuner off and sets the cuBLAS workspace.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def setup_logging() -> None:
    """Stage scripts log at INFO to stderr; library modules use their own loggers."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def forbid_unpickling() -> None:
    """Make every ``torch.load`` in this process tensors-only, also in third-party code that asks for
    ``weights_only=False`` or relies on the default (controlnet_aux's OpenPose, torch-fidelity): a weights
    file that hides code in a pickle is refused instead of run."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


# What lowers a stage's GPU memory, by the params section it reads: named in the out-of-memory message.
MEMORY_SAVERS = {
    "train": ["train.gradient_checkpointing: true", "train.optimizer: adamw_8bit", "a lower train.batch_size "
              "(with train.gradient_accumulation_steps to keep the effective batch)", "common.precision: fp16 or bf16",
              "a lower train.vae_batch_size"],
    "train_pose": ["train_pose.gradient_checkpointing: true", "train_pose.optimizer: adamw_8bit",
                   "train_pose.mode: lora", "a lower train_pose.batch_size", "common.precision: fp16 or bf16",
                   "a lower train_pose.vae_batch_size"],
    "sample": ["sample.cpu_offload: true", "a lower sample.batch_size", "common.precision: fp16 or bf16"],
    "generate_class_priors": ["a lower generate_class_priors.batch_size", "common.precision: fp16 or bf16"],
    "posebooth generate": ["a lower --batch-size", "--cpu-offload", "common.precision: fp16 or bf16"],
}  # fmt: skip
STAGE_SECTIONS = {"train_stage1_appearance": "train", "train_stage2_pose": "train_pose"}


def cuda_memory() -> tuple[int, int] | None:
    """(total bytes of the current CUDA device, the most this process had allocated on it), or None off CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    return torch.cuda.get_device_properties(device).total_memory, torch.cuda.max_memory_allocated(device)


def out_of_memory_message(stage: str, memory: tuple[int, int] | None) -> str:
    """The one line a stage ends with when the GPU runs out of memory: the stage, its memory, what to try."""
    had = (f"the GPU has {memory[0] / 2**30:.1f} GiB and this stage had {memory[1] / 2**30:.1f} GiB allocated"
           if memory else "GPU memory unknown")  # fmt: skip
    savers = MEMORY_SAVERS.get(STAGE_SECTIONS.get(stage, stage), ["common.precision: fp16 or bf16"])
    return f"{stage}: out of GPU memory ({had}); try {'; '.join(savers)} (dvc exp run -S key=value, or params.yaml)"


def run_stage(main: Callable[[], None], name: str | None = None) -> None:
    """Run a stage's ``main``: bad input (``ValueError``, ``OSError``) ends it with the message and exit code 1.

    Those errors are written for users (they name the file or key and what to do), so the traceback is
    shown only with ``POSEBOOTH_DEBUG=1``; so is running out of GPU memory, which ends the stage with one
    line naming the memory it had and the params that lower it. SIGINT (Ctrl-C) and SIGTERM unwind like an
    error, so temporary outputs are removed (exit codes 130 and 143); after SIGKILL the next run removes them.
    """
    setup_logging()
    forbid_unpickling()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except torch.OutOfMemoryError:
        if os.environ.get("POSEBOOTH_DEBUG"):
            raise
        stage = name or Path(sys.argv[0]).stem  # stage scripts: stages/<stage>.py
        logging.getLogger("posebooth").error("%s", out_of_memory_message(stage, cuda_memory()))
        sys.exit(1)
    except KeyboardInterrupt:
        logging.getLogger("posebooth").error("interrupted; run the stage again to resume")
        sys.exit(130)
    except SystemExit as stop:
        if stop.code == 128 + signal.SIGTERM:
            logging.getLogger("posebooth").error("terminated; run the stage again to resume")
        raise
    except (ValueError, OSError) as err:
        if os.environ.get("POSEBOOTH_DEBUG"):
            raise
        logging.getLogger("posebooth").error("%s: %s", type(err).__name__, err)
        sys.exit(1)
