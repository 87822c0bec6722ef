"""The pull request's report, as one folder of Markdown and pictures: `dvc params diff` and `dvc metrics diff`
against the base branch, the loss curves (every plot in dvc.yaml whose title names a loss, the base branch's run
beside this branch's) and the sample contact sheet.

CI's pipeline job (.github/workflows/posebooth.yml) builds it after `make repro` and uploads the folder; the privileged
workflow (.github/workflows/pr-report.yml) posts it with CML as one comment, updated on each push, without running any
of the pull request's code. It writes:
  <out>/report.md        the comment's text; pictures referenced by their file names
  <out>/loss_curves.png  one panel per loss plot: the base branch in a light tint, this branch in full colour
  <out>/sample_grid.png  a copy of plots/sample_grid.png (the `sample` stage's contact sheet)
  <out>/pr_number        with --pr: the pull request's number, digits only

Usage: python scripts/pr_report.py --base origin/main --out pr-report [--pr 42]
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image, ImageDraw, ImageFont

SAMPLE_GRID = Path("plots/sample_grid.png")
LOSS_IMAGE = "loss_curves.png"
GRID_IMAGE = "sample_grid.png"
MAX_TABLE_CHARS = 20_000  # a GitHub comment holds 65,536 characters; the pictures and text need the rest
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
PANEL_W, PANEL_H, MARGIN = 720, 260, 48


def dvc_table(command: str, base: str, repo: Path) -> str:
    """`dvc <command> diff <base> --md` in ``repo`` (the workspace against ``base``), cut to MAX_TABLE_CHARS."""
    argv = [sys.executable, "-m", "dvc", command, "diff", base, "--md"]
    proc = subprocess.run(argv, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[2:])}` failed in {repo} ({proc.returncode}): {proc.stderr.strip()}")
    table = proc.stdout.strip()
    if len(table.splitlines()) <= 2:  # nothing, or a header without rows
        return f"No {command} changed."
    if len(table) <= MAX_TABLE_CHARS:
        return table
    lines = table.splitlines()
    kept = []
    for line in lines:
        if sum(len(k) + 1 for k in kept) + len(line) > MAX_TABLE_CHARS:
            break
        kept.append(line)
    return "\n".join(kept) + f"\n\n({len(lines) - len(kept)} more rows: run `dvc {command} diff {base}`)"


def git_show(repo: Path, rev: str, path: str) -> str | None:
    """The text of ``path`` at ``rev``, or None when it does not exist there."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def loss_plots(dvc_yaml: str) -> dict[str, list[tuple[str, str, str]]]:
    """The top-level `plots:` of a dvc.yaml whose title names a loss: {title: [(file, x column, y column)]}."""
    plots = {}
    for entry in (yaml.safe_load(dvc_yaml) or {}).get("plots", []):
        if not isinstance(entry, dict):
            continue  # a bare path: images or a plot without a title
        for title, spec in entry.items():
            if "loss" not in title.lower() or not isinstance(spec, dict) or not isinstance(spec.get("y"), dict):
                continue
            series = []
            for file, columns in spec["y"].items():
                x = spec.get("x", "step")
                x = x.get(file, "step") if isinstance(x, dict) else x
                for column in [columns] if isinstance(columns, str) else columns:
                    series.append((file, x, column))
            plots[title] = series
    return plots


def read_curve(text: str | None, file: str, x: str, y: str) -> list[tuple[float, float]]:
    """(x, y) points of a dvclive TSV or CSV file's text; empty when the file or the column is missing."""
    if not text:
        return []
    rows = csv.DictReader(io.StringIO(text), delimiter="\t" if file.endswith(".tsv") else ",")
    return [(float(r[x]), float(r[y])) for r in rows if r.get(x) not in (None, "") and r.get(y) not in (None, "")]


def smooth(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A centred moving mean over a tenth of the points: per-step losses are too noisy to compare raw."""
    window = max(1, len(points) // 10)
    out = []
    for i, (x, _) in enumerate(points):
        chunk = points[max(0, i - window // 2) : i + window // 2 + 1]
        out.append((x, sum(v for _, v in chunk) / len(chunk)))
    return out


def tint(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """The colour mixed 65% towards white: the base branch's curves."""
    return tuple(int(c + 0.65 * (255 - c)) for c in colour)


def draw_panel(title: str, curves: list[tuple[str, list, list]]) -> Image.Image:
    """One chart: ``curves`` are (label, base points, head points), drawn smoothed; the axes span what is drawn."""
    font = ImageFont.load_default()
    panel = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((MARGIN, 6), title, fill="black", font=font)
    curves = [(label, smooth(base), smooth(head)) for label, base, head in curves]
    pts = [p for _, base, head in curves for p in base + head]
    left, top, right, bottom = MARGIN, 24, PANEL_W - 150, PANEL_H - 28
    draw.rectangle((left, top, right, bottom), outline="black")
    if not pts:
        draw.text((left + 8, top + 8), "no data", fill="black", font=font)
        return panel
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

    def to_px(p: tuple[float, float]) -> tuple[float, float]:
        return left + (p[0] - x0) / (x1 - x0) * (right - left), bottom - (p[1] - y0) / (y1 - y0) * (bottom - top)

    draw.text((4, top), f"{y1:.3g}", fill="black", font=font)
    draw.text((4, bottom - 10), f"{y0:.3g}", fill="black", font=font)
    draw.text((left, bottom + 4), f"{x0:g}", fill="black", font=font)
    draw.text((right - 30, bottom + 4), f"{x1:g}", fill="black", font=font)
    for k, (label, base, head) in enumerate(curves):
        colour = COLOURS[k % len(COLOURS)]
        for line, fill, width in ((base, tint(colour), 1), (head, colour, 2)):
            if len(line) > 1:
                draw.line([to_px(p) for p in line], fill=fill, width=width)
        draw.text((right + 8, top + 14 * k), label, fill=colour, font=font)
    draw.text((right + 8, bottom - 24), "light: base branch", fill="black", font=font)
    draw.text((right + 8, bottom - 12), "moving mean, 10%", fill="black", font=font)
    return panel


def loss_figure(repo: Path, base: str) -> Image.Image:
    """Every loss plot of the workspace's dvc.yaml, with the base branch's curves read from git at ``base``."""
    head_plots = loss_plots((repo / "dvc.yaml").read_text())
    base_plots = loss_plots(git_show(repo, base, "dvc.yaml") or "")
    panels = []
    for title, series in head_plots.items():
        base_series = base_plots.get(title, [])
        curves = []
        for file, x, y in series:
            # The base's file for the same column: it may live elsewhere if the layout changed on this branch.
            base_file, base_x = next(((f, bx) for f, bx, by in base_series if by == y), (file, x))
            path = repo / file
            head = read_curve(path.read_text() if path.exists() else None, file, x, y)
            curves.append((y, read_curve(git_show(repo, base, base_file), base_file, base_x, y), head))
        panels.append(draw_panel(title, curves))
    if not panels:
        raise ValueError(f"{repo / 'dvc.yaml'} declares no plot whose title names a loss (top-level `plots:`)")
    figure = Image.new("RGB", (PANEL_W, PANEL_H * len(panels)), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (0, i * PANEL_H))
    return figure


def build_report(repo: Path, base: str, out: Path, pr: str | None = None) -> Path:
    """Writes report.md, loss_curves.png, sample_grid.png (and pr_number) into ``out``; returns report.md's path."""
    if pr is not None and not re.fullmatch(r"[0-9]{1,10}", pr):
        raise ValueError(f"--pr must be a pull request's number (digits), got {pr!r}")
    if not (repo / SAMPLE_GRID).exists():
        raise FileNotFoundError(f"{repo / SAMPLE_GRID} is missing: run `make repro` (the `sample` stage) first")
    out.mkdir(parents=True, exist_ok=True)
    loss_figure(repo, base).save(out / LOSS_IMAGE)
    shutil.copyfile(repo / SAMPLE_GRID, out / GRID_IMAGE)
    text = f"""## posebooth: this branch against `{base}`

### Params (`dvc params diff`)

{dvc_table("params", base, repo)}

### Metrics (`dvc metrics diff`)

{dvc_table("metrics", base, repo)}

Stand-in backbones on the embedded model test the pipeline; they measure nothing.

### Loss curves

![Loss curves: the base branch light, this branch dark]({LOSS_IMAGE})

### Samples (`{SAMPLE_GRID}`)

![Sample contact sheet]({GRID_IMAGE})

Locally: `dvc plots diff {base}` draws every plot, validation images included, against the base branch.
"""
    (out / "report.md").write_text(text)
    if pr is not None:
        (out / "pr_number").write_text(pr + "\n")
    return out / "report.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision to compare with, e.g. origin/main")
    ap.add_argument("--out", type=Path, default=Path("pr-report"))
    ap.add_argument("--pr", help="the pull request's number, written to <out>/pr_number for the posting workflow")
    ap.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: here)")
    args = ap.parse_args()
    print(build_report(args.repo.resolve(), args.base, args.out, args.pr))


if __name__ == "__main__":
    main()
