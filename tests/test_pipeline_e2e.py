"""End to end: `dvc repro` of the embedded pipeline in a temporary copy of the repository, offline.

The session's reference run (the small test profile; ``reference_run`` in tests/conftest.py) is read by the
checks of every output and metric key and of a second `dvc repro` that does nothing. What changes a workspace
runs in a clone of it: a sampling-only experiment that re-runs only `sample` and `evaluate`; every stage-1
method and stage-2 choice, merged where orthogonal, queued with the README's sweep and run by two workers;
the README's own-photos steps; the whole pipeline on the tiny SDXL on two processes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.workspace import STAGES, Reference, clone

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reference")]


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def exp_rows(root: Path, env: dict) -> dict[str, dict]:
    """`dvc exp show --json` in ``root``: each experiment's name with its params and metrics files' data."""
    table = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    rows = {}
    for commit in table:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                rows[rev.get("name") or exp.get("name")] = {"params": params, "metrics": metrics}
    return rows


@pytest.fixture(scope="module")
def repo(reference_run) -> Reference:
    """The session's reference run (test profile, `dvc repro`, outputs committed): read, never changed."""
    return reference_run


def test_repro_runs_every_stage(repo):
    assert ran_stages(repo.stdout) == STAGES


def test_every_output(repo):
    root = repo.ws
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
    root = repo.ws
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
    root = repo.ws
    shown = json.loads(run(["dvc", "plots", "show", "--json"], root, repo.env).stdout)
    assert {"Stage 1 loss", "Stage 2 loss", "Evaluation metrics", "plots/sample_grid.png"} <= set(shown["data"])
    assert not shown.get("errors")
    rows = json.loads((root / "plots/evaluate_metrics.json").read_text())
    assert [r["metric"] for r in rows] == ["dino", "clip_i", "clip_t", "lpips_diversity", "lpips_to_references", "pres"]


def test_second_repro_is_a_no_op(repo):
    again = run(["dvc", "repro"], repo.ws, repo.env)
    assert ran_stages(again.stdout) == []
    assert "Data and pipelines are up to date" in again.stdout
    assert json.loads(run(["dvc", "status", "--json"], repo.ws, repo.env).stdout) == {}


# (Same seed, same outputs: tests/test_interruptions.py runs every stage again in another workspace with its own
# caches, and every output file equals the reference run's, bit for bit.)


def test_sampling_knob_reruns_only_sample_and_evaluate(repo, tmp_path):
    root, env = clone(repo, tmp_path, "knob")
    exp = run(["dvc", "exp", "run", "-n", "guidance-3", "-S", "sample.guidance_scale=3.0"], root, env)
    assert ran_stages(exp.stdout) == ["sample", "evaluate"]
    row = exp_rows(root, env)["guidance-3"]
    assert row["params"]["sample"]["guidance_scale"] == 3.0
    assert repo_metric(repo, "clip_t") != row["metrics"]["metrics/evaluate.json"]["clip_t"]["mean"]


def repo_metric(repo: Reference, name: str) -> float:
    """The reference run's mean of ``name`` (clip_t, clip_i, ...) in metrics/evaluate.json."""
    return json.loads((repo.ws / "metrics/evaluate.json").read_text())[name]["mean"]


# Every stage-1 method besides the default (lora) and every stage-2 choice besides the default (full fine-tune of
# a pretrained ControlNet), merged where the knobs are orthogonal: (params, the stages each must run again).
EXPERIMENTS = {
    "full-te-cn-lora": (["train.method=full", "train.train_text_encoder=true", "train.lr=1e-5",
                         "train_pose.mode=lora"], STAGES[3:]),
    "custom-diffusion-pose-paired": (["train.method=custom_diffusion", "train.train_token_embedding=true",
                                      "generate_class_priors.pose_paired=true"], STAGES[1:]),
    "ti-pose-library": (["train.method=textual_inversion", "train.new_token=true",
                         "sample.poses=['data/target_poses/wave.json#mirror','data/target_poses/t_pose.json#scale=0.7']",
                         "sample.control_guidance_end=0.6"], STAGES[3:]),
    "momentum-ti": (["train.method=momentum_ti", "train.ti_steps=3"], STAGES[3:]),
    "cn-lora-from-unet-unet-lora": (["train_pose.mode=lora", "train_pose.controlnet=from_unet",
                                     "train_pose.train_unet_lora=true", "train_pose.empty_prompt_prob=0.5"],
                                    STAGES[4:]),
}  # fmt: skip


@pytest.fixture(scope="module")
def experiments(repo, tmp_path_factory) -> tuple[Path, dict, dict[str, dict], dict[str, str]]:
    """Every experiment of ``EXPERIMENTS`` and the README's sweep (a grid on train.lr with 4 steps), queued in a
    clone of the reference and run by two workers: the clone, its environment, `dvc exp show` rows by name, and
    each queued experiment's log."""
    root, env = clone(repo, tmp_path_factory.mktemp("experiments"), "queue")
    for name, (sets, _) in EXPERIMENTS.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, *[a for kv in sets for a in ("-S", kv)]], root, env)
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=1e-4,5e-4", "-S", "train.steps=4"], root, env)
    run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 1800
    while True:  # until no task is queued or running
        status = run(["dvc", "queue", "status"], root, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)  # each poll is a `dvc` start-up: leave the CPU to the workers
    assert status.count("Success") == len(EXPERIMENTS) + 2 and "Failed" not in status, status
    logs = {name: run(["dvc", "queue", "logs", name], root, env).stdout for name in EXPERIMENTS}
    return root, env, exp_rows(root, env), logs


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_method_and_stage2_choice_runs_as_an_experiment(experiments, repo, name):
    """`dvc exp run -S ...` for each method and stage-2 choice: it runs again exactly the stages its params reach,
    and `dvc exp show` holds its row, with metrics measured on its own samples."""
    _, _, rows, logs = experiments
    sets, stages = EXPERIMENTS[name]
    assert ran_stages(logs[name]) == stages, logs[name][-2000:]
    row = rows[name]
    stage1 = row["metrics"]["metrics/train_stage1_appearance.json"]
    method = next((kv.split("=")[1] for kv in sets if kv.startswith("train.method=")), "lora")
    assert row["params"]["train"]["method"] == stage1["method"] == method
    ev = row["metrics"]["metrics/evaluate.json"]
    assert ev["n_images"] == 12  # 2 prompts x (2 poses + pose-free) x 2 seeds
    if name != "cn-lora-from-unet-unet-lora":  # (a from_unet ControlNet starts at zero: 4 steps leave it near)
        assert ev["clip_t"]["mean"] != repo_metric(repo, "clip_t")  # other weights or poses: other images, scores
    stage2 = row["metrics"]["metrics/train_stage2_pose.json"]
    assert stage2["class_pairs"] == (4 if "pose_paired" in " ".join(sets) else 0)


def test_readme_sweep_recipe_queues_a_grid_and_compares_it(experiments):
    """The README's sweep: a grid on train.lr queued, run by two workers, read back from `dvc exp show`."""
    _, _, rows, _ = experiments
    grid = {
        (row["params"]["train"]["lr"], row["metrics"]["metrics/evaluate.json"]["n_images"])
        for row in rows.values()
        if row["params"]["train"]["steps"] == 4
    }
    assert grid == {(1e-4, 12), (5e-4, 12)}


def test_a_bad_param_stops_a_stage_before_heavy_work(repo, tmp_path):
    root = repo.ws
    work = tmp_path / "w"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns(".dvc", ".git"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["lr"] = -1.0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([sys.executable, "-m", "stages.train_stage1_appearance"], work, repo.env, check=False)
    assert proc.returncode == 1
    assert "train.lr: -1.0 is out of range; it must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_few_photos_fail_and_leave_no_output(repo, tmp_path):
    root = repo.ws
    work = tmp_path / "w"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns(".dvc", ".git", "data"))
    (work / "photos").mkdir()
    for name in ("robot_01.jpg", "robot_02.jpg"):
        shutil.copy(ROOT / "data/subject" / name, work / "photos" / name)
    (work / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare_images"]["input_dir"] = "photos"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([sys.executable, "-m", "stages.prepare_images"], work, repo.env, check=False)
    assert proc.returncode != 0
    assert "only 2 usable photo(s) in photos" in proc.stderr and "broken.jpg" in proc.stderr
    assert not (work / "data" / "prepared").exists()


def test_generate_command_with_the_trained_adapters(repo, tmp_path):
    root, env, out = repo.ws, repo.env, tmp_path / "gen"
    proc = run([sys.executable, "-m", "posebooth", "generate", "a photo of {identifier} {class_noun} on the moon",
                "--pose", "data/target_poses/t_pose.json", "--seed", "3", "--negative-prompt", "blurry",
                "--scheduler", "euler", "--steps", "2", "--guidance", "4", "--conditioning-scale", "0.8",
                "--out", str(out)], root, env)  # fmt: skip
    (path,) = proc.stdout.split()
    assert Path(path) == out / "a_photo_of_sks_robot_on_the_moon_t_pose_s3.png"
    from PIL import Image

    assert Image.open(path).size == (32, 32)
    proc = run([sys.executable, "-m", "posebooth", "generate", "a photo of sks robot", "--num-images", "2", "--out",
                str(out)], root, env)  # fmt: skip
    assert len(proc.stdout.split()) == 2 and all(Path(p).exists() for p in proc.stdout.split())
    bad = run([sys.executable, "-m", "posebooth", "generate", "x", "--pose", "nope.json"], root, env, check=False)
    assert bad.returncode == 1 and "nope.json: cannot be read as JSON" in bad.stderr


def test_readme_own_photos_steps(repo, tmp_path):
    """The README's 'Your own subject' steps, inside the repository (dvc add) and from a folder outside it."""
    work, env = clone(repo, tmp_path, "own")
    # Inside the repository: photos tracked by DVC, never git.
    shutil.copytree(ROOT / "data" / "subject", work / "data" / "me")
    run(["dvc", "add", "data/me"], work, env)
    assert (work / "data" / "me.dvc").exists() and "/me" in (work / "data" / ".gitignore").read_text()
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare_images"]["input_dir"] = "data/me"
    params["common"]["class_noun"] = "toy"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "prepare_images"], work, env).stdout
    assert ran_stages(out) == ["prepare_images"]
    # Outside the repository: an absolute path works as the stage's dependency; the whole pipeline runs.
    outside = tmp_path / "photos elsewhere"
    shutil.copytree(ROOT / "data" / "subject", outside)
    params["prepare_images"]["input_dir"] = str(outside)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], work, env).stdout
    assert ran_stages(out) == STAGES
    manifest = json.loads((work / "data/prepared/manifest.json").read_text())
    assert all(r["source"].startswith(str(outside)) for r in manifest["images"])
    assert "a photo of a toy" == json.loads((work / "data/class_priors/manifest.json").read_text())["prompt"]
    assert json.loads((work / "metrics/evaluate.json").read_text())["n_images"] == 12


def test_the_whole_pipeline_on_the_tiny_sdxl_on_two_processes(repo, tmp_path):
    """The README's switch to SDXL (`posebooth use-profile tiny_sdxl`, then `dvc repro`) runs every stage on
    the SDXL-architecture model, with text-encoder LoRAs, pose-paired class priors through the SDXL ControlNet,
    and both training stages on two processes (`common.train_launcher`: gloo on the CPU here; DDP stops on any
    trainable parameter that gets no gradient). Its outputs load in the stock SDXL pipelines and give the
    sampled images again."""
    import numpy as np
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionXLControlNetPipeline
    from PIL import Image
    from safetensors import safe_open

    from posebooth import embedded

    work, env = clone(repo, tmp_path, "xl")
    run([sys.executable, "-m", "posebooth", "use-profile", "tiny_sdxl"], work, env)
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["common"]["model"] == "embedded:tiny-sdxl"
    params["train"]["train_text_encoder"] = True
    params["generate_class_priors"]["pose_paired"] = True
    params["common"]["train_launcher"] = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(["dvc", "repro"], work, env)
    out = proc.stdout + proc.stderr
    assert ran_stages(out) == STAGES[1:]  # prepare_images does not depend on the model
    assert "lora on 2 processes (accelerate launch)" in out and "2 processes (accelerate launch): 1 pair(s)" in out
    history = (work / "plots/train_stage1_appearance/loss.tsv").read_text().splitlines()
    assert len(history) == 1 + params["train"]["steps"]  # logged once (by the main process), not twice
    stage2 = json.loads((work / "metrics/train_stage2_pose.json").read_text())
    assert stage2["class_pairs"] == 4  # the pose-paired priors became (class image, pose) pairs in stage 2

    with safe_open(str(work / "models/stage1/pytorch_lora_weights.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert "StableDiffusionXLPipeline" in (work / "models/stage1/README.md").read_text()
    ev = json.loads((work / "metrics/evaluate.json").read_text())
    assert ev["n_images"] == 12 and ev["clip_i"]["mean"] != repo_metric(repo, "clip_i")

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

    gen = run([sys.executable, "-m", "posebooth", "generate", "a photo of {identifier} {class_noun}", "--pose",
               "data/target_poses/t_pose.json", "--steps", "2", "--out", str(tmp_path / "gen")], work, env)  # fmt: skip
    (path,) = gen.stdout.split()
    assert Image.open(path).size == (32, 32)
