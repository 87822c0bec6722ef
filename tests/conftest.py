"""Shared set-up: an offline environment and one embedded-model cache for the whole session.

The environment is set when this file is imported, before any test module imports huggingface_hub
(which reads HF_HUB_OFFLINE once, at import). Subprocesses (dvc, stage scripts) inherit it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

_OWN_CACHE = None if os.environ.get("POSEBOOTH_TEST_CACHE") else tempfile.mkdtemp(prefix="posebooth-test-cache-")
os.environ.update(
    {
        "POSEBOOTH_CACHE": os.environ.get("POSEBOOTH_TEST_CACHE") or _OWN_CACHE,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "TQDM_DISABLE": "1",
    }
)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def offline_env() -> str:
    """The embedded-model cache folder of this session (the environment is already offline)."""
    return os.environ["POSEBOOTH_CACHE"]


@pytest.fixture(scope="session")
def tiny_sd(offline_env) -> str:
    """Folder of the embedded tiny SD 1.5 pipeline (built once per session)."""
    from posebooth import embedded

    return embedded.resolve("embedded:tiny-sd15")


@pytest.fixture(autouse=True)
def seeded_global_generators():
    """Every test starts from the same global random state, whatever ran before it: libraries draw from
    the global generators (peft initialises LoRA weights with ``torch.randn``), so an unseeded test's
    result would depend on the test order."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one global state per process; each test may want other precision settings."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_sd):
    """The session's one `dvc repro` of the test profile (tests/workspace.py ``reference``), shared by the
    end-to-end, interruption, GPU-path and SDXL tests. Read it; to change anything in it, ``clone`` it. At the
    end of the session every output must still be what the run wrote."""
    from posebooth import embedded
    from tests.workspace import ALL_OUTPUTS, digests, reference

    ref = reference(tmp_path_factory.mktemp("reference"), str(embedded.cache_root()))
    yield ref
    now = digests(ref.ws, ALL_OUTPUTS)
    changed = sorted(k for k in now.keys() | ref.digests.keys() if now.get(k) != ref.digests.get(k))
    assert not changed, f"a test changed the shared reference run (clone it instead): {changed}"


@pytest.fixture
def refused_connections(monkeypatch) -> list:
    """Every network connection this test tries is refused and recorded (its address), so that a test can say
    "fails at once" as "tried at most the one probe, no download and no retry" instead of timing it."""
    import socket

    tried = []  # (host, port) of each attempt

    def create_connection(address, *args, **kwargs):
        tried.append(tuple(address[:2]))
        raise ConnectionRefusedError(f"connection to {address} refused (test)")

    def getaddrinfo(host, port, *args, **kwargs):  # what urllib3 (requests, huggingface_hub) calls first
        tried.append((host, port))
        raise socket.gaierror(f"{host}: no address (test)")

    def connect(sock, address, *args, **kwargs):
        tried.append(tuple(address[:2]))
        raise ConnectionRefusedError(f"connection to {address} refused (test)")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return tried
