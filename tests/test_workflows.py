"""The GitHub workflows: valid against GitHub's schema (checked offline, with the schema check-jsonschema ships), and
safe for pull requests from forks: the workflow that runs the pull request's code only reads, and the one that may
write (pr-report.yml, on `workflow_run`) runs nothing of the pull request and posts one comment, updated on each push.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))


def load(path: Path) -> dict:
    """A workflow as a dict, its triggers under "on" (YAML 1.1 reads the bare key `on` as True)."""
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))
    return data


def triggered_by(event: str) -> list[dict]:
    """The workflows that run on ``event``."""
    found = []
    for path in WORKFLOWS:
        data = load(path)
        on = data["on"]
        if on == event or (isinstance(on, (list, dict)) and event in on):
            found.append(data)
    return found


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def grants(permissions) -> list[str]:
    """The scopes a `permissions:` value lets write ("write-all" counts as all)."""
    if isinstance(permissions, str):
        return ["all"] if permissions == "write-all" else []
    return [scope for scope, level in (permissions or {}).items() if level == "write"]


def test_every_workflow_is_valid_for_github_offline():
    """check-jsonschema with its vendored GitHub-workflow schema, behind a proxy that refuses everything: a typo in a
    key (`step:`), a misplaced `with:` or a bad `on:` fails here and not on GitHub."""
    assert len(WORKFLOWS) >= 2, WORKFLOWS
    dead = "http://127.0.0.1:9"  # nothing listens: any download attempt fails the check
    env = dict(os.environ, HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, NO_PROXY="")
    argv = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
    proc = subprocess.run([*argv, *map(str, WORKFLOWS)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_workflow_that_runs_pull_request_code_only_reads():
    """Its token comes from the pull request's run: no write scope, no `pull_request_target` anywhere."""
    assert not triggered_by("pull_request_target")
    [pipeline] = triggered_by("pull_request")
    assert not grants(pipeline.get("permissions", "write-all")), pipeline.get("permissions")
    for name, job in pipeline["jobs"].items():
        assert not grants(job.get("permissions")), (name, job["permissions"])


def test_the_commenting_workflow_runs_nothing_of_the_pull_request():
    """pr-report.yml may write: it follows the pipeline's runs, reads the report artifact as data and never checks
    out, installs or executes code; no `${{ github.event... }}` is pasted into a shell script (injection)."""
    [pipeline] = triggered_by("pull_request")
    [poster] = triggered_by("workflow_run")
    assert poster["on"]["workflow_run"]["workflows"] == [pipeline["name"]]
    assert poster["on"]["workflow_run"]["types"] == ["completed"]
    assert not [s for s in steps(poster) if s.get("uses", "").startswith("actions/checkout")]
    runs = [s["run"] for s in steps(poster) if "run" in s]
    executes = re.compile(r"\b(make|pip3?|pytest|dvc|python3?|node|npx?|source|sh|bash)\b|(^|\s)\.{0,2}/\S")
    for run in runs:
        code = "\n".join(line for line in run.splitlines() if not line.lstrip().startswith("#"))
        assert not executes.search(code), run
        assert "${{" not in run, run
    downloads = [s["with"]["name"] for s in steps(poster) if s.get("uses", "").startswith("actions/download-artifact")]
    uploads = [s["with"]["name"] for s in steps(pipeline) if s.get("uses", "").startswith("actions/upload-artifact")]
    assert downloads == ["pr-report"] and "pr-report" in uploads, (downloads, uploads)


def test_the_comment_is_one_updated_comment_on_a_checked_pull_request():
    """The pull-request number from the artifact is checked as digits before use; the comment step updates the
    comment its watermark marks (`cml comment update`, not a new one per push), on that pull request, without CML
    publishing paths named in the untrusted Markdown."""
    [poster] = triggered_by("workflow_run")
    runs = [s["run"] for s in steps(poster) if "run" in s]
    check = next(i for i, run in enumerate(runs) if "pr_number" in run)
    assert re.search(r'\[\[ ! "\$number" =~ \^\[0-9\]\{1,10\}\$ \]\]', runs[check]), runs[check]
    [comment] = [i for i, run in enumerate(runs) if "cml comment" in run]
    assert comment > check
    command = " ".join(runs[comment].split())
    assert "cml comment update " in command and "cml comment create" not in command, command
    for flag in ('--target="pr/$PR_NUMBER"', "--watermark-title=", "--no-publish"):
        assert flag in command, (flag, command)
    assert not any("gh pr comment" in run for run in runs)
    [step] = [s for s in steps(poster) if "cml comment" in s.get("run", "")]
    assert step["env"]["PR_NUMBER"] == "${{ steps.pr.outputs.number }}"
