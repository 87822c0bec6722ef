"""The small test profile (profiles/test.yaml): params overrides that keep the embedded pipeline to about a minute."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT

TEST_PROFILE = yaml.safe_load((ROOT / "profiles" / "test.yaml").read_text())


def apply_profile(params: dict, profile: dict = TEST_PROFILE) -> dict:
    """``params`` with the profile's values set (section by section, key by key)."""
    out = {k: dict(v) for k, v in params.items()}
    for section, values in profile.items():
        out[section].update(values)
    return out
