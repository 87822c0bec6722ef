"""README.md's "Every parameter" table is params.yaml's keys, defaults and comments (scripts/params_table.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("params_table", ROOT / "scripts" / "params_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_params_yaml():
    """A key added to params.yaml, or a default changed, without re-running the script fails here."""
    pt = _module()
    readme, params_text = (ROOT / "README.md").read_text(), (ROOT / "params.yaml").read_text()
    assert pt.with_table(readme, params_text) == readme, "run: python scripts/params_table.py"


def test_every_key_is_explained():
    """Every key of params.yaml carries a comment (on its line or just above), so the table explains it."""
    pt = _module()
    text = (ROOT / "params.yaml").read_text()
    notes = pt.comments(text)
    keys = [f"{s}.{k}" for s, values in yaml.safe_load(text).items() for k in values]
    assert not [k for k in keys if not notes.get(k)], "params.yaml keys without a comment"


def test_table_reads_comments_and_defaults():
    """Inline comments, comments above a key, quoted '#', lists and empty strings, on a hand-written file."""
    pt = _module()
    text = (
        "# the file's header\n"
        "alpha:          # a section\n"
        "  lr: 1.0e-4    # the step size\n"
        "  # a comment above\n"
        "  # on two lines\n"
        "  prompts:\n"
        "    - one\n"
        "    - two\n"
        "    - three\n"
        "    - four\n"
        '  negative: "no # here"  # after the quote\n'
        '  empty: ""     # nothing\n'
        "  sizes: [1, 2]  # two\n"
    )
    rows = [line for line in pt.table(text).splitlines() if line.startswith("| `")]
    assert rows == [
        "| `lr` | `0.0001` | the step size |",
        "| `prompts` | 4 items | a comment above on two lines |",
        "| `negative` | `no # here` | after the quote |",
        '| `empty` | `""` | nothing |',
        "| `sizes` | `[1, 2]` | two |",
    ]
