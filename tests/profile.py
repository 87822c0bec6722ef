"""The small test profile: params overrides that keep the embedded pipeline to about a minute."""

from __future__ import annotations

TEST_PROFILE = {
    "common": {"resolution": 32},
    "generate_class_priors": {"num_class_images": 4, "batch_size": 4, "steps": 3},
    "train": {"steps": 6, "batch_size": 1},
    "train_pose": {"steps": 4, "batch_size": 1},
    "sample": {
        "prompts": ["a photo of {identifier} {class_noun}", "a {identifier} {class_noun} in the snow"],
        "poses": ["data/target_poses/standing.json", "data/target_poses/arms_up.json"],
        "seeds": [0, 1],
        "steps": 3,
    },
}


def apply_profile(params: dict, profile: dict = TEST_PROFILE) -> dict:
    """``params`` with the profile's values set (section by section, key by key)."""
    out = {k: dict(v) for k, v in params.items()}
    for section, values in profile.items():
        out[section].update(values)
    return out
