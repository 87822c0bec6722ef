"""Fail fast and clearly when weights from the Hugging Face Hub cannot be had.

huggingface_hub retries an unreachable Hub for about 20 seconds per file before it gives up; posebooth
checks the local cache first, then whether the Hub answers at all (a 3-second probe), and otherwise
stops at once naming the model and how to get it. ``HF_HUB_OFFLINE=1`` skips the probe.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse


def how_to_get(ref: str) -> str:
    return (
        f"download it on a connected machine (`hf download {ref}`) and copy the Hugging Face cache "
        "(~/.cache/huggingface) here, or point params.yaml at a local folder holding it"
    )


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host accepts a connection; False at once with ``HF_HUB_OFFLINE=1``."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_cached(repo_id: str, filename: str) -> bool:
    """Whether ``filename`` of ``repo_id`` is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return isinstance(found, str) and Path(found).exists()


def require(ref: str, probe_file: str, what: str) -> None:
    """Raise ``OSError`` at once if ``ref`` (a hub id) is neither a local folder, cached, nor downloadable."""
    if Path(ref).is_dir():
        if not (Path(ref) / probe_file).exists():
            raise FileNotFoundError(f"{what} {ref!r}: the folder has no {probe_file}")
        return
    if is_cached(ref, probe_file) or hub_reachable():
        return
    raise OSError(
        f"{what} {ref!r} is not on this machine and the Hugging Face Hub cannot be reached: {how_to_get(ref)}"
    )
