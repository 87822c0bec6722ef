"""Write README.md's "Every parameter" table from params.yaml: each key, its default and its comment.

    python scripts/params_table.py          # rewrite the table between the README's markers
    python scripts/params_table.py --check  # exit 1 when the README's table is out of date (tests/test_readme.py)

params.yaml stays the single source: a key's comment is the text after ``#`` on its line, or the comment
lines just above it. The table sits between ``<!-- params-table:start -->`` and ``<!-- params-table:end -->``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- params-table:start -->", "<!-- params-table:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")


def _comment(rest: str) -> str:
    """The comment after a value on a key's line (a ``#`` outside quotes), or ""."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "\"'" and quote in (None, ch):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1] in " \t"):
            return rest[i + 1 :].strip()
    return ""


def comments(text: str) -> dict[str, str]:
    """``section.key`` -> its comment, for every key at the first two levels of params.yaml's text."""
    found: dict[str, str] = {}
    section, above = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = KEY.match(line)
        if m is None or len(m["indent"]) > 2:
            above = []
            continue
        note = _comment(m["rest"]) or " ".join(above)
        above = []
        if not m["indent"]:
            section = m["key"]
        else:
            found[f"{section}.{m['key']}"] = note
    return found


def _value(v) -> str:
    """A default as a table cell: lists of more than three items are counted, not spelled out."""
    if isinstance(v, list) and len(v) > 3:
        return f"{len(v)} items"
    if isinstance(v, str):
        return f"`{v}`".replace("|", "\\|") if v else '`""`'
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return "`" + text.replace("|", "\\|") + "`"


def table(params_text: str) -> str:
    """The markdown table, one block per section, in params.yaml's order."""
    params = yaml.safe_load(params_text)
    notes = comments(params_text)
    lines = []
    for section, values in params.items():
        lines += [f"**`{section}`**", "", "| key | default | meaning |", "|---|---|---|"]
        for key, value in values.items():
            note = notes.get(f"{section}.{key}", "").replace("|", "\\|")
            lines.append(f"| `{key}` | {_value(value)} | {note} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def with_table(readme: str, params_text: str) -> str:
    """``readme`` with the text between the markers replaced by the current table."""
    if START not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(params_text)}{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail when README.md's table differs from params.yaml")
    args = ap.parse_args()
    readme_path = ROOT / "README.md"
    readme, params_text = readme_path.read_text(), (ROOT / "params.yaml").read_text()
    updated = with_table(readme, params_text)
    if args.check:
        if updated != readme:
            print("README.md's parameter table is out of date: run python scripts/params_table.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
