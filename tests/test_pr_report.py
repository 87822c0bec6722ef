"""scripts/pr_report.py on a tiny DVC repository: a base commit, then a workspace with a changed param, a changed
metric and a changed loss curve. The report has its four sections with the real diffs, every picture it names
exists, and the loss chart draws the base's curve beside this branch's."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.workspace import git_commit, git_init

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = """
stages:
  train:
    cmd: "true"
    params: [train.lr]
    metrics:
      - metrics/train.json: {cache: false}
    outs:
      - plots/train: {cache: false}
plots:
  - Train loss:
      x: step
      y:
        plots/train/loss.tsv: [loss]
  - plots/sample_grid.png
"""


def pr_report():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("pr_report", ROOT / "scripts" / "pr_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_report(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/pr_report.py run as CI runs it, in ``cwd``."""
    argv = [sys.executable, str(ROOT / "scripts" / "pr_report.py"), *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def write_run(ws: Path, lr: float, metric: float, losses: list[float]) -> None:
    """The files a run of the tiny pipeline would leave: params, metrics, a loss curve, the contact sheet."""
    (ws / "params.yaml").write_text(f"train:\n  lr: {lr}\n")
    (ws / "metrics").mkdir(exist_ok=True)
    (ws / "metrics" / "train.json").write_text(json.dumps({"loss": metric}))
    (ws / "plots" / "train").mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i}\t{v}\n" for i, v in enumerate(losses))
    (ws / "plots" / "train" / "loss.tsv").write_text("step\tloss\n" + rows)
    Image.new("RGB", (8, 8), "gray").save(ws / "plots" / "sample_grid.png")


def test_the_report_diffs_params_metrics_and_curves_against_the_base(tmp_path: Path):
    ws = tmp_path / "repo"
    ws.mkdir()
    (ws / "dvc.yaml").write_text(DVC_YAML)
    write_run(ws, lr=0.1, metric=0.5, losses=[1.0 - 0.01 * i for i in range(40)])
    env = dict(os.environ)
    git_init(ws, env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, env=env, check=True, capture_output=True)
    git_commit(ws, env, "base")
    write_run(ws, lr=0.2, metric=0.25, losses=[0.5 - 0.01 * i for i in range(40)])

    out = tmp_path / "report"
    proc = run_report(ws, "--base", "main", "--out", str(out), "--pr", "7")
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    sections = re.findall(r"^### (\w+)", text, re.M)
    assert sections == ["Params", "Metrics", "Loss", "Samples"], text
    params = text.split("### Params")[1].split("###")[0]
    metrics = text.split("### Metrics")[1].split("###")[0]
    assert re.search(r"\| train\.lr +\| 0\.1 +\| 0\.2 ", params), params
    assert re.search(r"\| loss +\| 0\.5 +\| 0\.25 ", metrics), metrics
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == ["loss_curves.png", "sample_grid.png"], images
    for name in images:
        Image.open(out / name).verify()
    assert (out / "pr_number").read_text() == "7\n"

    # Both curves are drawn: this branch in full colour, the base (read from git) in its tint.
    module = pr_report()
    colours = {colour for _, colour in Image.open(out / "loss_curves.png").convert("RGB").getcolors(1 << 20)}
    assert module.COLOURS[0] in colours and module.tint(module.COLOURS[0]) in colours


def test_a_pull_request_number_must_be_digits(tmp_path: Path):
    """The number travels to the workflow that may write; the report refuses anything else before writing it."""
    proc = run_report(ROOT, "--base", "main", "--out", str(tmp_path), "--pr", "7;x")
    assert proc.returncode != 0 and "--pr must be" in proc.stderr, proc.stderr
    assert not (tmp_path / "pr_number").exists()
