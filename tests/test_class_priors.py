"""generate_class_priors: resumes from its cache without regenerating, or takes the user's class photos."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys

import pytest
import yaml

from posebooth import config, image_cache
from posebooth.models import weights_fingerprint
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


def cache_folder(workdir):
    cfg = config.load(["common", "generate_class_priors"], workdir / "params.yaml")
    c, g = cfg.common, cfg.generate_class_priors
    key = image_cache.cache_key(
        model=weights_fingerprint(c.model), prompt=config.fill(c.class_prompt, c), negative_prompt=g.negative_prompt,
        resolution=c.resolution, steps=g.steps, guidance_scale=g.guidance_scale, scheduler=g.scheduler,
        precision=c.precision,
    )  # fmt: skip
    return image_cache.cache_dir(key)


def test_resume_without_regeneration(workdir, monkeypatch, caplog):
    out = workdir / "class_priors"
    stage = run_stage(monkeypatch, out)
    first = digests(out)
    assert len(first) == 4
    cache = cache_folder(workdir)
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
