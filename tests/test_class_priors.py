"""generate_class_priors: resumes from its cache without regenerating, or takes the user's class photos."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import sys

import pytest
import yaml

from posebooth import image_cache
from tests.conftest import ROOT
from tests.profile import apply_profile


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A folder with params.yaml (test profile, a seed no other test uses) as the current directory."""
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["common"]["seed"] = 4242
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(monkeypatch, out):
    from stages import generate_class_priors

    monkeypatch.setattr(sys, "argv", ["generate_class_priors", "--out", str(out)])
    generate_class_priors.main()
    return generate_class_priors


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").glob("*.png"))}


def cache_folder(out):
    """The cache folder the stage used, by the key its manifest records."""
    return image_cache.cache_dir(json.loads((out / "manifest.json").read_text())["cache_key"])


def test_resume_without_regeneration(workdir, monkeypatch, caplog):
    out = workdir / "class_priors"
    stage = run_stage(monkeypatch, out)
    first = digests(out)
    assert len(first) == 4
    cache = cache_folder(out)
    assert sorted(p.name for p in cache.glob("*.png")) == [f"{4242 * 1_000_000 + i}.png" for i in range(4)]

    # DVC deleted the output; the cache holds every image: the model is never even loaded.
    shutil.rmtree(out)

    def no_model(*a, **k):
        raise AssertionError("the base model was loaded although every class image was cached")

    monkeypatch.setattr(stage, "load_components", no_model)
    run_stage(monkeypatch, out)
    assert digests(out) == first
    monkeypatch.undo()
    monkeypatch.chdir(workdir)

    # An interrupted run left one image missing and one truncated: only those two are made again.
    (cache / f"{4242 * 1_000_000}.png").unlink()
    truncated = cache / f"{4242 * 1_000_000 + 1}.png"
    truncated.write_bytes(truncated.read_bytes()[:50])
    caplog.clear()
    caplog.set_level(logging.INFO)
    run_stage(monkeypatch, out)
    assert "2 of 4 class image(s) found in the cache" in caplog.text
    assert digests(out) == first  # each image depends only on its seed


def test_user_class_folder(workdir, monkeypatch):
    photos = workdir / "my_class"
    photos.mkdir()
    for name in ("robot_01.jpg", "robot_02.jpg", "robot_03.png"):
        shutil.copy(ROOT / "data" / "subject" / name, photos / name)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["generate_class_priors"].update(source="folder", class_dir="my_class", num_class_images=2)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    out = workdir / "class_priors"
    run_stage(monkeypatch, out)
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["source"] == "folder" and len(manifest["images"]) == 2
    assert [r["source"].split("/")[-1] for r in manifest["images"]] == ["robot_01.jpg", "robot_02.jpg"]
    assert len(digests(out)) == 2


class _LookedUp(Exception):
    """Raised where the stage first looks into its image cache: (cache folder name, seed)."""


def first_lookup(workdir, monkeypatch, params: dict, **change) -> tuple[str, int]:
    """The cache folder and seed the stage looks up first with ``params`` and ``change``
    (``section__key=value``); it stops there, before loading any model."""
    params = copy.deepcopy(params)
    for dotted, value in change.items():
        section, key = dotted.split("__")
        assert key in params[section], dotted  # a typo must not pass as "same key"
        params[section][key] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))

    def stop(folder, seed, resolution):
        raise _LookedUp(folder.name, seed)

    monkeypatch.setattr(image_cache, "load_cached", stop)
    with pytest.raises(_LookedUp) as looked:
        run_stage(monkeypatch, workdir / "class_priors")
    return looked.value.args


# Written by hand, not read from the stage: what the class images depend on (besides their seed) ...
CHANGES_THE_IMAGES = {
    "common__model": "other_model",  # a local folder (made below): other weights
    "common__vae": "other_vae",
    "common__class_noun": "teddy bear",  # the class prompt's word
    "common__class_prompt": "a picture of a {class_noun}",
    "common__resolution": 48,
    "common__precision": "bf16",
    "generate_class_priors__negative_prompt": "blurry",
    "generate_class_priors__steps": 4,
    "generate_class_priors__guidance_scale": 7.5,
    "generate_class_priors__scheduler": "euler",
}
# ... and what they do not: how they are batched and counted, the instance prompt, and the pose settings
# while pose_paired is off.
KEEPS_THE_IMAGES = {
    "generate_class_priors__batch_size": 1,
    "generate_class_priors__num_class_images": 2,
    "common__identifier": "zqv",
    "common__instance_prompt": "a {identifier}",
    "generate_class_priors__controlnet": "other_controlnet",
    "extract_poses__render_size": 128,
}


def test_every_generation_param_changes_the_cache_key(workdir, monkeypatch):
    for name in ("other_model", "other_vae", "other_controlnet"):
        (workdir / name).mkdir()
        (workdir / name / "weights.safetensors").write_bytes(name.encode())
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    base, seed = first_lookup(workdir, monkeypatch, params)
    assert seed == 4242 * 1_000_000
    for dotted, value in CHANGES_THE_IMAGES.items():
        assert first_lookup(workdir, monkeypatch, params, **{dotted: value})[0] != base, dotted
    for dotted, value in KEEPS_THE_IMAGES.items():
        assert first_lookup(workdir, monkeypatch, params, **{dotted: value}) == (base, seed), dotted
    # The seed names the images inside the folder: another seed looks up other files.
    assert first_lookup(workdir, monkeypatch, params, common__seed=7) == (base, 7 * 1_000_000)


def test_pose_paired_cache_key_follows_the_poses_and_the_controlnet(workdir, monkeypatch):
    from stages import prepare_images

    shutil.copytree(ROOT / "data" / "subject", workdir / "data" / "subject")
    monkeypatch.setattr(sys, "argv", ["prepare_images"])
    prepare_images.main()  # data/prepared: the instance photos and their (sidecar) poses
    (workdir / "other_controlnet").mkdir()
    (workdir / "other_controlnet" / "weights.safetensors").write_bytes(b"other")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["generate_class_priors"]["pose_paired"] = True
    base, _ = first_lookup(workdir, monkeypatch, params)
    assert base != first_lookup(workdir, monkeypatch, params, generate_class_priors__pose_paired=False)[0]
    assert first_lookup(workdir, monkeypatch, params, generate_class_priors__controlnet="other_controlnet")[0] != base
    assert first_lookup(workdir, monkeypatch, params, extract_poses__render_size=128)[0] != base
    assert first_lookup(workdir, monkeypatch, params, generate_class_priors__batch_size=1)[0] == base
    keypoints = sorted((workdir / "data" / "prepared" / "keypoints").glob("*.json"))[0]
    pose = json.loads(keypoints.read_text())
    pose["keypoints"][0][0] += 1.0  # one instance keypoint moves by a pixel
    keypoints.write_text(json.dumps(pose))
    assert first_lookup(workdir, monkeypatch, params)[0] != base
