"""A DVC remote, as the README's "Remotes" section uses it: `dvc push` from one clone, `dvc pull` in another.

The pusher is a clone of the session's reference run (outputs, cache, git history); it adds a default remote,
commits that config and pushes. The puller is a plain `git clone` of the pusher: the committed metrics and plots
but no cached output and no cache. After `dvc pull` every output equals the reference run's, byte for byte, and
`dvc repro` runs nothing. Two remotes: a local folder, and S3 served on loopback by moto (through dvc-s3), so
the endpoint, credentials and region settings of an S3 remote are exercised offline. The named artifacts in
dvc.yaml come back the way users get them, with `dvc artifacts get`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.workspace import ALL_OUTPUTS, WHO, Reference, clone, digests, git_commit

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reference")]

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
# Outputs that only the DVC cache (and so a remote) holds; the `cache: false` ones are committed to git.
CACHED = [
    out if isinstance(out, str) else next(iter(out))
    for stage in DVC["stages"].values()
    for out in stage.get("outs", [])
    if isinstance(out, str) or next(iter(out.values())).get("cache", True)
]
BUCKET = "posebooth-test"


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture
def s3(tmp_path):
    """An S3 endpoint on 127.0.0.1 (moto's server, in this process) with an empty bucket; yields the endpoint
    URL, the environment a client needs (dummy credentials, no AWS config files of this machine) and a boto3
    client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",  # moto accepts any
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "NO_PROXY": "127.0.0.1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield endpoint, aws, client
    finally:
        server.stop()


def stored_files(kind: str, remote: Path, client) -> int:
    """How many files the remote holds."""
    if kind == "local":
        return sum(1 for f in remote.rglob("*") if f.is_file())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="posebooth/")
    return sum(page.get("KeyCount", 0) for page in pages)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_push_then_pull_in_a_fresh_clone_brings_back_every_output(reference_run: Reference, tmp_path, request, kind):
    pusher, env = clone(reference_run, tmp_path, "pusher")
    remote, client = tmp_path / "remote", None
    if kind == "local":
        url, settings = str(remote), {}
    else:
        endpoint, aws, client = request.getfixturevalue("s3")
        url, settings = f"s3://{BUCKET}/posebooth", {"endpointurl": endpoint, "region": "us-east-1"}
        env = env | aws
    run(["dvc", "remote", "add", "-d", "storage", url], pusher, env)
    for key, value in settings.items():
        run(["dvc", "remote", "modify", "storage", key, value], pusher, env)
    git_commit(pusher, env, "a default remote")
    for name in DVC["artifacts"]:  # a registered version: what `dvc artifacts get` looks for
        run(["git", "tag", "-a", f"{name}@v1.0.0", "-m", "the reference run"], pusher, env | WHO)
    assert stored_files(kind, remote, client) == 0
    run(["dvc", "push"], pusher, env)
    assert stored_files(kind, remote, client) > 0
    shutil.rmtree(pusher / ".dvc" / "cache")  # from here on the remote is the only copy of the cached outputs

    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(pusher), str(fresh)], tmp_path, env)
    assert not (fresh / ".dvc" / "cache").exists()
    assert not [p for p in CACHED if (fresh / p).exists()], "a cached output came with git"
    run(["dvc", "pull"], fresh, env)
    now = digests(fresh, ALL_OUTPUTS)
    differ = sorted(k for k in now.keys() | reference_run.digests.keys() if now.get(k) != reference_run.digests.get(k))
    assert not differ, f"not as the reference run wrote them after `dvc pull`: {differ}"

    again = run(["dvc", "repro"], fresh, env)
    assert re.findall(r"Running stage '([^']+)'", again.stdout) == []
    assert "Data and pipelines are up to date" in again.stdout

    # The README's `dvc artifacts get`: each named model's latest version, from the repository and its remote.
    for name, artifact in DVC["artifacts"].items():
        run(["dvc", "artifacts", "get", str(pusher), name, "-o", str(tmp_path / name)], tmp_path, env)
        got = {k.split("/", 1)[1]: v for k, v in digests(tmp_path, [name]).items()}
        prefix = artifact["path"] + "/"
        want = {k.removeprefix(prefix): v for k, v in reference_run.digests.items() if k.startswith(prefix)}
        assert got and got == want, name
