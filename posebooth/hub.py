"""Fail fast and clearly when weights from the Hugging Face Hub cannot be had.

huggingface_hub retries an unreachable Hub for about 20 seconds per file before it gives up; posebooth
checks the local cache first, then whether the Hub answers at all (a 3-second probe), and otherwise
stops at once naming the model and how to get it. ``HF_HUB_OFFLINE=1`` skips the probe.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path
from urllib.parse import urlparse


def how_to_get(ref: str) -> str:
    return (
        f"download it on a connected machine (`hf download {ref}`) and copy the Hugging Face cache "
        "(~/.cache/huggingface) here, or point params.yaml at a local folder holding it"
    )


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "POSEBOOTH_OFFLINE")


def offline() -> bool:
    """Whether the environment says not to try the network (``HF_HUB_OFFLINE`` or ``POSEBOOTH_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_VARIABLES)


@cache
def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether ``host`` accepts a connection (a 3-second probe); False at once when offline()."""
    if offline():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``) answers."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return reachable(url.hostname, url.port or 443)


def release_file(local: str, url: str, key: str, what: str) -> Path:
    """The path of a weights file: ``local`` when given (params key ``key``), else ``url``'s file in torch
    hub's cache, downloaded when missing. Fails at once, naming the URL and the folder, when it is missing
    and the URL's host cannot be reached."""
    if local:
        path = Path(local)
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} does not exist")
        return path
    from torch.hub import download_url_to_file, get_dir

    path = Path(get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.exists():
        return path
    if not reachable(urlparse(url).hostname):
        raise OSError(
            f"{what} are not on this machine and {urlparse(url).hostname} cannot be reached: download {url} "
            f"on a connected machine into {path.parent}, or set {key} to a local file"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(url, str(path))
    return path


def load_weights(path: Path) -> dict:
    """A state dict from ``.safetensors``, or from a third-party ``.pth`` read with ``weights_only=True``
    (tensors only: a pickle that would run code is refused)."""
    import torch

    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


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
