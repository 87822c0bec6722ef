"""The regression guard on the world: the default pipeline, cut down, must still learn the subject and follow poses.

One `dvc repro` of the world default (fewer class images, prompts, poses and sampling steps; the training params
as committed) in a temporary copy of the repository, scored by the world's measuring models. Stage 1 must raise
the subject's DINO similarity clearly above the base model's for the same prompts, and
the posed samples must follow their target poses far better than pose-free samples of the same prompts do,
through the stage-2 ControlNet at least as well as through the pretrained one. The margins are set well inside
what a seeded CPU run gives (the closing note of issue 16 lists the runs) and well outside what a broken loss,
a zero LoRA scale or an ignored pose map gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.workspace import copy_repository, git_init, remove_outputs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("guard")]

# A cut-down sample and evaluate: four context prompts, one posed prompt in three poses, four seeds.
GUARD = {
    "generate_class_priors": {"num_class_images": 8},
    "sample": {
        "prompts": [
            "a {identifier} {class_noun} on the beach",
            "a {identifier} {class_noun} in the snow",
            "a {identifier} {class_noun} in the jungle",
            "a {identifier} {class_noun} with a city in the background",
        ],
        "pose_prompts": ["a photo of {identifier} {class_noun}"],
        "poses": ["data/target_poses/standing.json", "data/target_poses/arms_up.json", "data/target_poses/t_pose.json"],
        "seeds": [0, 1, 2, 3],
        "batch_size": 8,
    },
    "evaluate": {"fid_model": "none"},
}


def world_run(root: Path, overrides: dict = GUARD) -> tuple[dict, dict]:
    """metrics/evaluate.json and evaluate.info.json (what measured) of one `dvc repro` of the world default with
    ``overrides`` in a copy under ``root``."""
    ws = root / "world"
    ws.mkdir(parents=True)
    copy_repository(ws)
    remove_outputs(ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    git_init(ws, env)
    proc = subprocess.run(["dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tuple(json.loads((ws / "metrics" / name).read_text()) for name in ("evaluate.json", "evaluate.info.json"))


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory) -> tuple[dict, dict]:
    return world_run(tmp_path_factory.mktemp("guard"))


@pytest.fixture(scope="module")
def metrics(guard_run) -> dict:
    return guard_run[0]


def test_the_numbers_come_from_the_world(guard_run):
    """Every measuring model is the world's: neither a stand-in nor a real model."""
    metrics, info = guard_run
    assert info["backbones"]["clip"]["source"] == info["backbones"]["dino"]["source"] == "world"
    assert info["pose_adherence"]["source"] == "world" and info["pose_adherence"]["detector"] == "world"
    assert metrics["verification_threshold"]["eer"] < 0.15


def test_stage1_learns_the_subject(metrics):
    """Pose-free samples of the trained subject are much closer to its photos than the base model's for the same
    prompts (without the identifier), by the world's DINO. (Its calibrated same-instance test passes too few of
    either to guard on: the world's figures are blurred, see the README.)"""
    trained, base = metrics["pose_free"], metrics["base_model"]
    assert trained["n_images"] == base["n_images"] == 16
    assert trained["dino"]["mean"] > base["dino"]["mean"] + DINO_MARGIN, (trained["dino"], base["dino"])


def test_poses_are_followed(metrics):
    """Posed samples follow their targets: PCK@0.2 far above pose-free samples of the same prompt scored against
    the same targets, and the stage-2 ControlNet at least as close as the pretrained one."""
    stage2 = metrics["pose_adherence"]["pck_0.2"]
    pretrained = metrics["pretrained_controlnet"]["pose_adherence"]["pck_0.2"]
    unposed = metrics["unposed_against_targets"]["pck_0.2"]
    assert metrics["pose_adherence"]["n_images"] == 12
    assert stage2 >= unposed + PCK_MARGIN, (stage2, unposed)
    assert stage2 >= pretrained - STAGE2_SLACK, (stage2, pretrained)


# Margins (see the module docstring).
DINO_MARGIN = 0.1
PCK_MARGIN = 0.3
STAGE2_SLACK = 0.05
