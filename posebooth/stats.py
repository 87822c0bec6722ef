"""How much a number can be trusted: bootstrap confidence intervals over the images behind it.

A metric computed on 12 images is not the same claim as one on 400; every number posebooth reports comes
with ``n`` and a percentile bootstrap interval (Efron 1979): resample the per-item values with
replacement ``resamples`` times (from a fixed seed, so the interval is reproducible), take the mean of
each resample, and report the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means.
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (per-item scores); ``None`` for no values.
    One value gives a zero-width interval (there is no spread to resample)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summary(values, digits: int = 6, **kwargs) -> dict:
    """``{"mean", "ci_low", "ci_high", "n"}`` of per-item ``values`` (``None`` entries are left out)."""
    v = [x for x in values if x is not None]
    ci = bootstrap_ci(v, **kwargs)
    return {
        "mean": None if not v else round(float(np.mean(v)), digits),
        "ci_low": None if ci is None else round(ci[0], digits),
        "ci_high": None if ci is None else round(ci[1], digits),
        "n": len(v),
    }
