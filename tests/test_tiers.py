"""The slow tier's scheduling: `make test-all` runs on two pytest-xdist workers with `--dist loadgroup`, and the
session's reference run (conftest `reference_run`) and the world guard's run are each made once only because every
test that uses one of them carries the same `xdist_group` mark. If the grouping silently stops working (pytest 9.2
with pytest-xdist 3.8 does: pytest-dev/pytest-xdist#1386, hence the pin on pytest 9.1.1), each worker makes its own
copy of both runs and the tier takes ten minutes longer while still passing. This test fails instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

GROUPED = """
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reference")]


@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    pass
"""

FREE = """
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("i", range(8))
def test_free(i):
    pass
"""


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path):
    """Two modules of one group (as test_pipeline_e2e and test_interruptions share the reference run) land on the
    same worker, run with the Makefile's own options."""
    (tmp_path / "test_grouped_a.py").write_text(GROUPED)
    (tmp_path / "test_grouped_b.py").write_text(GROUPED)
    (tmp_path / "test_free.py").write_text(FREE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    make_test_all = re.search(r"^test-all:.*\n\t(.*)$", (Path(__file__).parents[1] / "Makefile").read_text(), re.M)
    options = make_test_all.group(1).split(" -m pytest ", 1)[1].split()
    assert options[:2] == ["-m", "slow"] and "loadgroup" in options, options
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *options, "-v", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = defaultdict(set)
    for worker, test in re.findall(r"\[(gw\d+)\] \[ *\d+%\] PASSED (\S+)", proc.stdout):
        workers["grouped" if "grouped" in test else "free"].add(worker)
    assert sum(1 for line in proc.stdout.splitlines() if " PASSED " in line) == 16, proc.stdout
    assert len(workers["grouped"]) == 1, f"the group ran on {sorted(workers['grouped'])}:\n{proc.stdout}"
