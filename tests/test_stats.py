"""Bootstrap intervals: cover the mean, shrink with more data, reproducible, honest on tiny sets."""

from __future__ import annotations

import numpy as np
import pytest

from posebooth.stats import bootstrap_ci, summary


def test_interval_covers_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.7, 0.1, 10), rng.normal(0.7, 0.1, 1000)
    for v in (small, large):
        lo, hi = bootstrap_ci(v)
        assert lo <= v.mean() <= hi
    assert np.subtract(*bootstrap_ci(large)[::-1]) < np.subtract(*bootstrap_ci(small)[::-1]) / 3


def test_interval_matches_the_normal_approximation_on_a_big_sample():
    v = np.random.default_rng(2).normal(0.0, 1.0, 4000)
    lo, hi = bootstrap_ci(v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))
    assert lo == pytest.approx(v.mean() - half, abs=0.01) and hi == pytest.approx(v.mean() + half, abs=0.01)


def test_reproducible_and_tiny_sets():
    v = [0.1, 0.5, 0.9]
    assert bootstrap_ci(v) == bootstrap_ci(v)
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    assert bootstrap_ci([]) is None and bootstrap_ci([None]) is None
    s = summary([0.2, None, 0.4])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.3) and s["ci_low"] <= 0.3 <= s["ci_high"]
