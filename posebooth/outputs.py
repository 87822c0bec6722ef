"""Writing stage outputs the DVC way: complete or not at all (temporary path, then rename)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
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


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def setup_logging() -> None:
    """Stage scripts log at INFO to stderr; library modules use their own loggers."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``: bad input (``ValueError``, ``OSError``) ends it with the message and exit code 1.

    Those errors are written for users (they name the file or key and what to do), so the traceback is
    shown only with ``POSEBOOTH_DEBUG=1``.
    """
    setup_logging()
    try:
        main()
    except (ValueError, OSError) as err:
        if os.environ.get("POSEBOOTH_DEBUG"):
            raise
        logging.getLogger("posebooth").error("%s: %s", type(err).__name__, err)
        sys.exit(1)
