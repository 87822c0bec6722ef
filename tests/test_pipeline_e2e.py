"""End to end: `dvc repro` of the embedded pipeline in a temporary copy of the repository, offline.

One module-scoped run (the small test profile) is shared by the checks below: every output and metric
key, a second `dvc repro` that does nothing, and a sampling-only experiment that re-runs only
`sample` and `evaluate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.profile import apply_profile
from tests.workspace import STAGES, copy_repository

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` and `dvc` of this venv
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env.setdefault(var, "posebooth tests")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env.setdefault(var, "tests@posebooth.invalid")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A temporary copy of the repository with the test profile, after one `dvc repro`."""
    dest = tmp_path_factory.mktemp("e2e") / "posebooth"
    dest.mkdir()
    copy_repository(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(apply_profile(params), sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "test profile"], dest)
    first = run(["dvc", "repro"], dest)
    return dest, first


def test_repro_runs_every_stage(repo):
    _, first = repo
    assert ran_stages(first.stdout) == STAGES


def test_every_output(repo):
    root, _ = repo
    prepared = json.loads((root / "data/prepared/manifest.json").read_text())
    assert len(prepared["images"]) == 6 and all(
        (root / "data/prepared/images" / f"{r['name']}.png").exists() for r in prepared["images"]
    )
    assert len(list((root / "data/prepared/keypoints").glob("*.json"))) == 6
    priors = json.loads((root / "data/class_priors/manifest.json").read_text())
    assert len(priors["images"]) == 4 and len({r["seed"] for r in priors["images"]}) == 4
    report = json.loads((root / "data/poses/report.json").read_text())
    assert sum(r["used"] for r in report["images"] if r["kind"] == "instance") == 6
    assert [r["reason"] for r in report["images"] if r["kind"] == "class"] == [
        "sidecar: no annotation (sidecar keypoints exist only for your photos)"
    ] * 4
    assert len(list((root / "data/poses/maps").glob("*.png"))) == 6
    assert (root / "models/stage1/pytorch_lora_weights.safetensors").stat().st_size > 0
    # Provenance: params, git revision, package versions, a model card. The test profile trains stage 1 on
    # random templates without the class word, so its trigger is the first of them.
    for stage, trigger in (("stage1", "a photo of a sks"), ("stage2", "a photo of sks robot")):
        prov = json.loads((root / f"models/{stage}/provenance.json").read_text())
        assert prov["params"]["common"]["model"] == "embedded:tiny-sd15" and prov["trigger"] == trigger
        assert len(prov["git"]["commit"]) == 40 and prov["packages"]["diffusers"]
        card = (root / f"models/{stage}/README.md").read_text()
        assert "embedded:tiny-sd15" in card and trigger in card and "load_lora_weights" in card
    assert json.loads((root / "models/stage1/provenance.json").read_text())["params"]["train"]["steps"] == 6
    assert (root / "models/stage2/controlnet/diffusion_pytorch_model.safetensors").exists()
    index = json.loads((root / "samples/index.json").read_text())
    assert len(index["images"]) == 2 * (2 + 1) * 2 + 2  # prompts x (poses + pose-free) x seeds, + class prompt
    assert all((root / "samples" / r["file"]).exists() for r in index["images"])
    assert (root / "plots/sample_grid.png").stat().st_size > 0
    loss = (root / "plots/train_stage1_appearance/loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and len(loss) == 1 + 6
    validation = sorted(p.name for p in (root / "plots/train_stage1_appearance/images/validation").glob("*.png"))
    assert validation == ["0_step_00003.png", "0_step_00006.png", "1_step_00003.png", "1_step_00006.png"]
    assert (root / "models/stage1/subject_lora_kohya.safetensors").exists()
    assert not list(root.rglob(".*.tmp-*")), "temporary outputs left behind"


def test_every_metric_key(repo):
    root, _ = repo
    m = {s: json.loads((root / f"metrics/{s}.json").read_text()) for s in
         ("prepare_images", "extract_poses", "train_stage1_appearance", "train_stage2_pose", "evaluate")}  # fmt: skip
    assert m["prepare_images"] == {"images": 6, "skipped": 0, "with_keypoints": 6, "face_crops": 0}
    assert m["extract_poses"] == {"images": 6, "with_pose": 6, "left_out": 0, "class_images": 4, "class_with_pose": 0}
    for key in ("loss", "instance_loss", "prior_loss", "grad_norm", "step", "steps", "trainable_params"):
        assert key in m["train_stage1_appearance"], key
    assert m["train_stage1_appearance"]["prior_loss"] > 0  # prior preservation was on
    assert {"loss", "grad_norm", "steps", "pairs", "class_pairs"} <= set(m["train_stage2_pose"])
    assert m["train_stage2_pose"]["class_pairs"] == 0  # sidecar: class images have no poses
    ev = m["evaluate"]
    for part in (ev, ev["posed"], ev["pose_free"]):
        for key in ("dino", "clip_i", "clip_t", "lpips_to_references", "lpips_diversity"):
            metric = part[key]
            assert metric["ci_low"] <= metric["mean"] <= metric["ci_high"], key  # an interval around the mean
            assert metric["n"] == (part["n_images"] if key != "lpips_diversity" else part["n_images"] // 2), key
    assert ev["n_images"] == 12 and ev["n_references"] == 6 and ev["lpips_diversity"]["n"] == 6
    assert ev["pres"]["n"] == 2  # the class prompt, one image per seed
    assert ev["face_identity"].startswith("not measured: evaluate.face_identity is auto (class 'robot')")
    assert ev["fid_kid"]["n_generated"] == 12 and ev["fid_kid"]["kid_subset_size"] == 6  # 6 reference photos
    assert ev["stand_in"] is True and all(b["stand_in"] for b in ev["backbones"].values())
    breakdown = json.loads((root / "metrics/evaluate_breakdown.json").read_text())
    assert set(breakdown["per_pose"]) == {"None", "standing", "arms_up"} and len(breakdown["per_prompt"]) == 2
    assert sum(p["n_images"] for p in breakdown["per_prompt"].values()) == 12
    assert ev["pose_adherence"].startswith("not measured: the sidecar detector")


def test_plots_include_the_metric_chart(repo):
    root, _ = repo
    shown = json.loads(run(["dvc", "plots", "show", "--json"], root).stdout)
    assert {"Stage 1 loss", "Stage 2 loss", "Evaluation metrics", "plots/sample_grid.png"} <= set(shown["data"])
    assert not shown.get("errors")
    rows = json.loads((root / "plots/evaluate_metrics.json").read_text())
    assert [r["metric"] for r in rows] == ["dino", "clip_i", "clip_t", "lpips_diversity", "lpips_to_references", "pres"]


def test_second_repro_is_a_no_op(repo):
    root, _ = repo
    again = run(["dvc", "repro"], root)
    assert ran_stages(again.stdout) == []
    assert "Data and pipelines are up to date" in again.stdout
    status = run(["dvc", "status", "--json"], root)
    assert json.loads(status.stdout) == {}


def test_same_seed_same_weights_and_images(repo):
    """Forced re-runs of stage 1 and of sampling give bit-identical LoRA weights and images on CPU."""
    root, _ = repo

    def digest(paths):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    lora = [root / "models/stage1/pytorch_lora_weights.safetensors"]
    images = sorted((root / "samples/images").glob("*.png"))
    before = digest(lora + images)
    for stage in ("train_stage1_appearance", "sample"):
        run(["dvc", "repro", "-f", "-s", stage], root)
    assert digest(lora + images) == before
    assert json.loads(run(["dvc", "status", "--json"], root).stdout) == {}


def test_sampling_knob_reruns_only_sample_and_evaluate(repo):
    root, _ = repo
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline outputs"], root)
    exp = run(["dvc", "exp", "run", "-S", "sample.guidance_scale=3.0"], root)
    assert ran_stages(exp.stdout) == ["sample", "evaluate"]
    table = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    assert "3.0" in json.dumps(table) or '"guidance_scale": 3' in json.dumps(table)


METHOD_RUNS = {
    "full": ["train.method=full", "train.train_text_encoder=true", "train.lr=1e-5"],
    "custom_diffusion": ["train.method=custom_diffusion", "train.train_token_embedding=true"],
    "textual_inversion": ["train.method=textual_inversion", "train.new_token=true"],
    "momentum_ti": ["train.method=momentum_ti", "train.ti_steps=3"],
}


STAGE2_RUNS = {  # every stage-2 choice besides the default (full fine-tune of a pretrained ControlNet)
    "cn-lora": (["train_pose.mode=lora"], STAGES[4:]),
    "cn-lora-from-unet-unet-lora": (
        ["train_pose.mode=lora", "train_pose.controlnet=from_unet", "train_pose.train_unet_lora=true",
         "train_pose.empty_prompt_prob=0.5"], STAGES[4:]),
    "pose-paired-priors": (["generate_class_priors.pose_paired=true"], STAGES[1:2] + STAGES[2:]),
    "sample-pose-library": (
        ["sample.poses=['data/target_poses/wave.json#mirror','data/target_poses/t_pose.json#scale=0.7']",
         "sample.control_guidance_end=0.6"], STAGES[5:]),
}  # fmt: skip


def test_every_stage2_choice_runs_the_pipeline(repo):
    root, _ = repo
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "outputs", "--allow-empty"], root)
    for name, (sets, stages) in STAGE2_RUNS.items():
        out = run(["dvc", "exp", "run", "--temp", "-n", name, *[a for kv in sets for a in ("-S", kv)]], root)
        assert ran_stages(out.stdout) == stages, (name, out.stdout[-2000:])
    table = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], root).stdout))
    assert all(name in table for name in STAGE2_RUNS)
    assert '"class_pairs": 4' in table  # the pose-paired priors became (class image, pose) pairs in stage 2


def test_every_method_runs_the_whole_pipeline_as_an_experiment(repo):
    """`dvc exp run -S train.method=<m>` for the four methods the default run does not use (it uses lora),
    each in its own temporary workspace; `dvc exp show` then holds a row per method with its metrics."""
    root, _ = repo
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "outputs", "--allow-empty"], root)
    for name, sets in METHOD_RUNS.items():
        out = run(
            ["dvc", "exp", "run", "--temp", "-n", f"method-{name}", *[a for kv in sets for a in ("-S", kv)]], root
        )
        assert ran_stages(out.stdout) == STAGES[3:], (name, out.stdout[-2000:])
    table = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    rows = {}
    for commit in table:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
                stage1 = data.get("metrics", {}).get("metrics/train_stage1_appearance.json", {}).get("data", {})
                rows[rev.get("name") or exp.get("name")] = (params.get("train", {}).get("method"), metrics, stage1)
    for name in METHOD_RUNS:
        method, metrics, stage1 = rows[f"method-{name}"]
        assert method == name and stage1["method"] == name
        assert metrics["n_images"] == 12 and -1 <= metrics["clip_i"]["mean"] <= 1


def test_a_bad_param_stops_a_stage_before_heavy_work(repo, tmp_path):
    root, _ = repo
    work = tmp_path / "w"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns(".dvc", ".git"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["lr"] = -1.0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([sys.executable, "-m", "stages.train_stage1_appearance"], work, check=False)
    assert proc.returncode == 1
    assert "train.lr: -1.0 is out of range; it must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_few_photos_fail_and_leave_no_output(repo, tmp_path):
    root, _ = repo
    work = tmp_path / "w"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns(".dvc", ".git", "data"))
    (work / "photos").mkdir()
    for name in ("robot_01.jpg", "robot_02.jpg"):
        shutil.copy(ROOT / "data/subject" / name, work / "photos" / name)
    (work / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare_images"]["input_dir"] = "photos"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([sys.executable, "-m", "stages.prepare_images"], work, check=False)
    assert proc.returncode != 0
    assert "only 2 usable photo(s) in photos" in proc.stderr and "broken.jpg" in proc.stderr
    assert not (work / "data" / "prepared").exists()


def test_generate_command_with_the_trained_adapters(repo):
    root, _ = repo
    proc = run([sys.executable, "-m", "posebooth", "generate", "a photo of {identifier} {class_noun} on the moon",
                "--pose", "data/target_poses/t_pose.json", "--seed", "3", "--negative-prompt", "blurry",
                "--scheduler", "euler", "--steps", "2", "--guidance", "4", "--conditioning-scale", "0.8",
                "--out", "gen"], root)  # fmt: skip
    (path,) = proc.stdout.split()
    assert path == "gen/a_photo_of_sks_robot_on_the_moon_t_pose_s3.png"
    from PIL import Image

    assert Image.open(root / path).size == (32, 32)
    proc = run(
        [sys.executable, "-m", "posebooth", "generate", "a photo of sks robot", "--num-images", "2", "--out", "gen"],
        root,
    )
    assert len(proc.stdout.split()) == 2 and all((root / p).exists() for p in proc.stdout.split())
    bad = run([sys.executable, "-m", "posebooth", "generate", "x", "--pose", "nope.json"], root, check=False)
    assert bad.returncode == 1 and "nope.json: cannot be read as JSON" in bad.stderr


def test_readme_own_photos_steps(repo, tmp_path):
    """The README's 'Your own subject' steps, inside the repository (dvc add) and from a folder outside it."""
    root, _ = repo
    work = tmp_path / "own"
    shutil.copytree(root, work, symlinks=True)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "outputs", "--allow-empty"], work)
    # Inside the repository: photos tracked by DVC, never git.
    shutil.copytree(ROOT / "data" / "subject", work / "data" / "me")
    run(["dvc", "add", "data/me"], work)
    assert (work / "data" / "me.dvc").exists() and "/me" in (work / "data" / ".gitignore").read_text()
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare_images"]["input_dir"] = "data/me"
    params["common"]["class_noun"] = "toy"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "prepare_images"], work).stdout
    assert ran_stages(out) == ["prepare_images"]
    # Outside the repository: an absolute path works as the stage's dependency; the whole pipeline runs.
    outside = tmp_path / "photos elsewhere"
    shutil.copytree(ROOT / "data" / "subject", outside)
    params["prepare_images"]["input_dir"] = str(outside)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], work).stdout
    assert ran_stages(out) == STAGES
    manifest = json.loads((work / "data/prepared/manifest.json").read_text())
    assert all(r["source"].startswith(str(outside)) for r in manifest["images"])
    assert "a photo of a toy" == json.loads((work / "data/class_priors/manifest.json").read_text())["prompt"]
    assert json.loads((work / "metrics/evaluate.json").read_text())["n_images"] == 12


def test_readme_sweep_recipe_queues_a_grid_and_compares_it(repo):
    """The README's sweep: a grid on train.lr queued, run by two workers, read back from `dvc exp show`."""
    import time

    root, _ = repo
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "outputs", "--allow-empty"], root)
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=1e-4,5e-4", "-S", "train.steps=4"], root)
    run(["dvc", "queue", "start", "-j", "2"], root)
    deadline = time.monotonic() + 1200
    while True:
        status = run(["dvc", "queue", "status"], root).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") >= 2 and "Failed" not in status, status
    table = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    grid = set()
    for commit in table:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                train = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("train", {})
                ev = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
                if train.get("steps") == 4 and ev:
                    grid.add((train["lr"], ev["n_images"]))
    assert grid == {(1e-4, 12), (5e-4, 12)}


def test_the_whole_pipeline_on_the_tiny_sdxl(repo, tmp_path):
    """The README's switch to SDXL (`posebooth use-profile tiny_sdxl`, then `dvc repro`) runs every stage on
    the SDXL-architecture model, text-encoder LoRAs on; its outputs load in the stock SDXL pipelines and
    give the sampled images again."""
    import numpy as np
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionXLControlNetPipeline
    from PIL import Image
    from safetensors import safe_open

    from posebooth import embedded

    root, _ = repo
    work = tmp_path / "xl"
    shutil.copytree(root, work, symlinks=True)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "outputs", "--allow-empty"], work)
    run([sys.executable, "-m", "posebooth", "use-profile", "tiny_sdxl"], work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["common"]["model"] == "embedded:tiny-sdxl"
    params["train"]["train_text_encoder"] = True
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], work).stdout
    assert ran_stages(out) == STAGES[1:]  # prepare_images does not depend on the model

    with safe_open(str(work / "models/stage1/pytorch_lora_weights.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert "StableDiffusionXLPipeline" in (work / "models/stage1/README.md").read_text()
    ev = json.loads((work / "metrics/evaluate.json").read_text())
    assert ev["n_images"] == 12 and -1 <= ev["clip_i"]["mean"] <= 1

    index = json.loads((work / "samples/index.json").read_text())
    record = next(r for r in index["images"] if r["pose"])
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        embedded.resolve("embedded:tiny-sdxl"), add_watermarker=False, use_safetensors=True,
        controlnet=ControlNetModel.from_pretrained(str(work / "models/stage2/controlnet"), use_safetensors=True),
    )  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(work / "models/stage1"), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        record["prompt"], negative_prompt=record["negative_prompt"], image=Image.open(work / f"samples/poses/{record['pose']}.png"),
        num_inference_steps=record["steps"], guidance_scale=record["guidance_scale"], height=32, width=32,
        controlnet_conditioning_scale=record["conditioning_scale"], generator=torch.Generator().manual_seed(record["seed"]),
    ).images[0]  # fmt: skip
    sampled = np.asarray(Image.open(work / "samples" / record["file"]), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - sampled).max() <= 2  # batched vs alone: rounding only

    # Pose-paired class priors through the SDXL ControlNet, and (class image, pose) pairs in stage 2.
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "tiny sdxl"], work)
    out = run(["dvc", "exp", "run", "--temp", "-n", "xl-pose-paired", "-S", "generate_class_priors.pose_paired=true"],
              work)  # fmt: skip
    assert ran_stages(out.stdout) == STAGES[1:]
    assert '"class_pairs": 4' in run(["dvc", "exp", "show", "--json"], work).stdout
    gen = run([sys.executable, "-m", "posebooth", "generate", "a photo of {identifier} {class_noun}", "--pose",
               "data/target_poses/t_pose.json", "--steps", "2", "--out", "gen"], work)  # fmt: skip
    (path,) = gen.stdout.split()
    assert Image.open(work / path).size == (32, 32)
