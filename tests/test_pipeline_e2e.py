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
from tests.workspace import OUTPUTS, STAGES, Reference, clone, digests, under

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
    """`dvc exp show --json` in ``root``: each row's name (the workspace, the baseline commit's name or revision,
    each experiment's name) with its params and metrics files' data."""
    table = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    rows = {}

    def add(name: str, state: dict) -> None:
        data = state.get("data") or {}
        metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        rows[name] = {"params": params, "metrics": metrics}

    for commit in table:
        add(commit.get("name") or commit["rev"], commit)
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                add(rev.get("name") or exp.get("name"), rev)
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
    curves = root / "plots/train_stage1_appearance/plots/metrics"
    loss = (curves / "loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and len(loss) == 1 + 6
    for name in ("instance_loss", "prior_loss", "lr", "grad_norm"):  # each declared as a plot in dvc.yaml
        assert len((curves / f"{name}.tsv").read_text().splitlines()) == 1 + 6, name
    assert not (root / "plots/train_stage1_appearance/metrics.json").exists()  # the summary is metrics/<stage>.json
    assert (root / "models/stage1/exports/sks_robot_lora.safetensors").exists()  # posebooth/exports.py
    assert len(list((root / "models/stage2/exports").glob("*_openpose_controlnet.safetensors"))) == 1
    assert not list(root.rglob(".*.tmp-*")), "temporary outputs left behind"


# The VS Code DVC extension's MULTI_IMAGE_PATH_REG (extension/src/plots/model/collect.ts): only images named
# <folder>/<digits>.<ext> are shown as one plot per folder with a step slider.
MULTI_IMAGE_PATH_REG = re.compile(r"[^/]+[/\\]\d+\.[a-z]+$", re.IGNORECASE)


def test_validation_images_get_a_step_slider(repo):
    """Stage 1's validation images, as `dvc plots show` lists them (the plots declared in dvc.yaml), are one
    series per validation prompt with one image per validation step: what the extension shows with a slider."""
    proc = run(["dvc", "plots", "show", "--json", "--split"], repo.ws, repo.env)
    data = json.loads(proc.stdout)["data"]
    images = sorted(k for k in data if k.endswith(".png") and "/plots/images/" in k)
    assert images and all(MULTI_IMAGE_PATH_REG.search(k) for k in images), images
    series: dict[str, list[int]] = {}
    for k in images:
        folder, step = k.rsplit("/", 2)[-2:]
        series.setdefault(folder, []).append(int(step.removesuffix(".png")))
    assert {k: sorted(v) for k, v in series.items()} == {"validation_0": [3, 6], "validation_1": [3, 6]}
    curves = [f"Stage {n} {what}" for n in (1, 2) for what in ("loss", "learning rate", "gradient norm")]
    assert all(data.get(name) for name in curves), sorted(data)  # declared in dvc.yaml, each with data


def test_every_metric_key(repo):
    root = repo.ws
    m = {s: json.loads((root / f"metrics/{s}.json").read_text()) for s in
         ("prepare_images", "extract_poses", "train_stage1_appearance", "train_stage2_pose", "evaluate")}  # fmt: skip
    assert m["prepare_images"] == {"images": 6, "skipped": 0, "with_keypoints": 6, "with_captions": 0, "face_crops": 0}
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
    info = json.loads((root / "metrics/evaluate.info.json").read_text())  # what measured, and why not
    assert info["not_measured"]["face_identity"] == "evaluate.face_identity is auto (class 'robot')"
    assert set(ev["face_identity"].values()) == {None}
    assert ev["fid_kid"]["n_generated"] == 12 and ev["fid_kid"]["kid_subset_size"] == 6  # 6 reference photos
    assert ev["stand_in"] == 1 and all(b["stand_in"] for b in info["backbones"].values())
    breakdown = json.loads((root / "metrics/evaluate_breakdown.json").read_text())
    assert set(breakdown["per_pose"]) == {"None", "standing", "arms_up"} and len(breakdown["per_prompt"]) == 2
    assert sum(p["n_images"] for p in breakdown["per_prompt"].values()) == 12
    assert info["not_measured"]["pose_adherence"].startswith("the sidecar detector")
    assert set(ev["pose_adherence"].values()) == {None} and info["pose_adherence"]["detector"] == "sidecar"


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
# momentum_ti's DreamBooth part trains a LoKr (train.adapter), which stage 2, sample and evaluate load through PEFT.
EXPERIMENTS = {
    "full-te-cn-lora": (["train.method=full", "train.train_text_encoder=true", "train.lr=1e-5",
                         "train_pose.mode=lora"], STAGES[3:]),
    "custom-diffusion-pose-paired": (["train.method=custom_diffusion", "train.train_token_embedding=true",
                                      "generate_class_priors.pose_paired=true"], STAGES[1:]),
    "ti-pose-library": (["train.method=textual_inversion", "train.new_token=true",
                         "sample.poses=['data/target_poses/wave.json#mirror','data/target_poses/t_pose.json#scale=0.7']",
                         "sample.control_guidance_end=0.6"], STAGES[3:]),
    "momentum-ti-lokr": (["train.method=momentum_ti", "train.ti_steps=3", "train.adapter=lokr"], STAGES[3:]),
    "cn-lora-from-unet-unet-lora": (["train_pose.mode=lora", "train_pose.controlnet=from_unet",
                                     "train_pose.train_unet_lora=true", "train_pose.empty_prompt_prob=0.5"],
                                    STAGES[4:]),
}  # fmt: skip


def run_queue(root: Path, env: dict, timeout: float = 1800) -> str:
    """`dvc queue start -j 2` in ``root``, then `dvc queue status` until no task is queued or running: its output;
    then `dvc queue stop`.

    The workers are daemons that inherit `dvc queue start`'s stdout and stderr: not pipes of ours, or reading them
    to their end waits for the last worker to exit. And a worker can outlive the empty queue: two workers writing
    the filesystem broker's reply exchange at once can leave invalid JSON, which kills the monitor thread that
    would end an idle worker (treeverse/dvc-task#73, treeverse/dvc#10428; seen here once in CI's slow tier, the
    run then waited 30 minutes). So the test stops them itself, as the README tells users to."""
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=300)  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], root, env).stdout
        if "Queued" not in status and "Running" not in status:
            run(["dvc", "queue", "stop"], root, env, check=False)  # (idle workers only: nothing is running)
            return status
        assert time.monotonic() < deadline, status
        time.sleep(5)  # each poll is a `dvc` start-up: leave the CPU to the workers


@pytest.fixture(scope="module")
def experiments(repo, tmp_path_factory) -> tuple[Path, dict, dict[str, dict], dict[str, str]]:
    """Every experiment of ``EXPERIMENTS`` and the README's sweep (a grid on train.lr with 4 steps), queued in a
    clone of the reference and run by two workers: the clone, its environment, `dvc exp show` rows by name, and
    each queued experiment's log."""
    root, env = clone(repo, tmp_path_factory.mktemp("experiments"), "queue")
    for name, (sets, _) in EXPERIMENTS.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, *[a for kv in sets for a in ("-S", kv)]], root, env)
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=1e-4,5e-4", "-S", "train.steps=4"], root, env)
    status = run_queue(root, env)
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
    assert row["params"]["train"]["method"] == method and stage1["trainable_params"] > 0
    ev = row["metrics"]["metrics/evaluate.json"]
    assert ev["n_images"] == 12  # 2 prompts x (2 poses + pose-free) x 2 seeds
    if name != "cn-lora-from-unet-unet-lora":  # (a from_unet ControlNet starts at zero: 4 steps leave it near)
        assert ev["clip_t"]["mean"] != repo_metric(repo, "clip_t")  # other weights or poses: other images, scores
    stage2 = row["metrics"]["metrics/train_stage2_pose.json"]
    assert stage2["class_pairs"] == (4 if "pose_paired" in " ".join(sets) else 0)


# The `dvc exp show` columns the README names (file:key, nested keys joined with dots).
README_COLUMNS = {f"metrics/evaluate.json:{k}" for k in ("dino.mean", "clip_i.mean", "clip_t.mean", "pres.mean",
                  "lpips_diversity.mean", "fid_kid.kid", "pose_adherence.pck_0.2")} | {
                  "metrics/train_stage1_appearance.json:loss"}  # fmt: skip


def test_every_metrics_column_is_a_number_in_every_row(repo, experiments):
    """`dvc exp show` of the baseline and every experiment (other methods, stage-2 choices, poses): each metrics
    column exists in every row and holds a number or None, so no column comes and goes between rows. (`dvc exp
    show --json` leaves out a block that is null in every row, here pose adherence: the test profile's sidecar
    detector measures none; the files themselves hold every README column.)"""
    from posebooth.outputs import flatten, is_metric_value

    files = {f"{p}:{k}" for p in ("metrics/evaluate.json", "metrics/train_stage1_appearance.json")
             for k in flatten(json.loads((repo.ws / p).read_text()))}  # fmt: skip
    assert README_COLUMNS <= files, README_COLUMNS - files
    _, _, rows, _ = experiments
    assert len(rows) >= len(EXPERIMENTS) + 3  # the workspace, the baseline commit, the experiments, the sweep
    columns = {name: {f"{path}:{k}": v for path, data in row["metrics"].items() for k, v in flatten(data).items()}
               for name, row in rows.items()}  # fmt: skip
    every = set().union(*columns.values())
    assert README_COLUMNS - {"metrics/evaluate.json:pose_adherence.pck_0.2"} <= every, README_COLUMNS - every
    for name, values in columns.items():
        assert set(values) == every, (name, sorted(every - set(values)))
        assert all(is_metric_value(v) for v in values.values()), (name, {k: v for k, v in values.items()
                                                                        if not is_metric_value(v)})  # fmt: skip


def test_readme_sweep_recipe_queues_a_grid_and_compares_it(experiments):
    """The README's sweep: a grid on train.lr queued, run by two workers, read back from `dvc exp show`."""
    _, _, rows, _ = experiments
    grid = {
        (row["params"]["train"]["lr"], row["metrics"]["metrics/evaluate.json"]["n_images"])
        for row in rows.values()
        if row["params"]["train"]["steps"] == 4
    }
    assert grid == {(1e-4, 12), (5e-4, 12)}


def test_two_queued_experiments_with_equal_training_each_get_the_single_run_models(repo, tmp_path):
    """Two experiments whose training params are the reference's (training forced to run again) and whose sampling
    seeds differ, queued and run at once by two workers: each trains from scratch in checkpoint folders of its own
    workspace (shared ones were deleted by the first to finish, under the other), both succeed with the reference's
    models byte for byte, and each samples its own seeds (the reference's seeds: the reference's samples)."""
    root, env = clone(repo, tmp_path, "twins")
    seeds = {"twin-ref-seeds": [0, 1], "twin-other-seeds": [2, 3]}
    # The train stages, sample and evaluate, forced (both targets: the queue checks out their upstream outputs).
    forced = ["-f", "--downstream", "train_stage1_appearance", "train_stage2_pose"]
    for name, s in seeds.items():
        run(["dvc", "exp", "run", "--queue", *forced, "-n", name, "-S", f"sample.seeds={s}"], root, env)
    status = run_queue(root, env)
    logs = {name: run(["dvc", "queue", "logs", name], root, env).stdout for name in seeds}
    assert status.count("Success") == 2 and "Failed" not in status, status + "\n".join(logs.values())
    saved = {name: set(re.findall(r"training state of step \d+ saved in (\S+)", log)) for name, log in logs.items()}
    assert [len(folders) for folders in saved.values()] == [2, 2], saved  # stage 1 (its LoRA phase), stage 2
    assert not saved["twin-ref-seeds"] & saved["twin-other-seeds"], saved  # no checkpoint folder in common
    models = OUTPUTS["train_stage1_appearance"][:1] + OUTPUTS["train_stage2_pose"][:1]
    assert models == ["models/stage1", "models/stage2"]
    want = {k: v for k, v in repo.digests.items() if under(k, models)}
    samples = {}
    for name, s in seeds.items():
        assert ran_stages(logs[name]) == STAGES[3:], logs[name][-2000:]
        assert "resuming" not in logs[name], logs[name][-2000:]  # nothing left by the other experiment's training
        run(["dvc", "exp", "apply", name], root, env)
        assert digests(root, models) == want, name
        samples[name] = digests(root, ["samples"])
        index = json.loads((root / "samples/index.json").read_text())["images"]
        assert sorted({image["seed"] for image in index}) == s
    assert samples["twin-ref-seeds"] == {k: v for k, v in repo.digests.items() if under(k, ["samples"])}
    other = {v for k, v in samples["twin-other-seeds"].items() if k.endswith(".png") and "/images/" in k}
    assert other and not other & set(samples["twin-ref-seeds"].values())


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
    """The README's switch to SDXL (`posebooth use-profile test tiny_sdxl`: the test profile's sizes on the tiny
    SDXL, then `dvc repro`) runs every stage on the SDXL-architecture model, with text-encoder LoRAs, pose-paired
    class priors through the SDXL ControlNet,
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
    run([sys.executable, "-m", "posebooth", "use-profile", "test", "tiny_sdxl"], work, env)  # both on the defaults
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
    history = (work / "plots/train_stage1_appearance/plots/metrics/loss.tsv").read_text().splitlines()
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
