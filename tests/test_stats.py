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


@pytest.mark.parametrize(("level", "z"), [(0.95, 1.960), (0.90, 1.645)])
def test_interval_matches_the_normal_approximation_on_a_big_sample(level, z):
    """On 4,000 normal values the interval of the mean is mean ± z σ / √n (z of the level, from a table), to
    10 % of that half-width (measured: 3 %): a 90 % interval given for 95 % is 16 % narrower, one of the
    data's spread instead of the mean's √n = 63 times wider."""
    v = np.random.default_rng(2).normal(0.0, 1.0, 4000)
    lo, hi = bootstrap_ci(v, level=level)
    half = z * v.std(ddof=1) / np.sqrt(len(v))  # 0.031 at 95 %
    assert v.mean() - lo == pytest.approx(half, rel=0.1) and hi - v.mean() == pytest.approx(half, rel=0.1)
    assert bootstrap_ci(v) == bootstrap_ci(v, level=0.95)  # the default level


def test_reproducible_and_tiny_sets():
    v = [0.1, 0.5, 0.9]
    assert bootstrap_ci(v) == bootstrap_ci(v)
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    assert bootstrap_ci([]) is None and bootstrap_ci([None]) is None
    s = summary([0.2, None, 0.4])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.3) and s["ci_low"] <= 0.3 <= s["ci_high"]
