"""What runs differently where users train: CUDA device placement (rehearsed on a fake ``cuda`` device),
half precision, several processes, fp16 resume, memory at real sizes, and running out of it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from posebooth import checkpoints, outputs, training
from posebooth.models import encode_posterior, load_components, load_controlnet
from tests.conftest import ROOT

# --- the CUDA rehearsal (tests/cuda_rehearsal.py) on the stages' own code --------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reference_run):
    """A clone of the session's reference run (test profile, every stage ran on the CPU), and its environment."""
    from tests.workspace import clone

    return clone(reference_run, tmp_path_factory.mktemp("gpu"), "G")


def _rehearse(ws, env, stage: str, **overrides) -> subprocess.CompletedProcess:
    """``stage`` under tests/cuda_rehearsal.py with ``common.device: cuda`` and ``overrides`` ({"train.method":
    ...}), params.yaml put back afterwards."""
    original = (ws / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["common"]["device"] = "cuda"
    params["train"]["checkpoint_every"] = params["train_pose"]["checkpoint_every"] = 0
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return subprocess.run([sys.executable, "-m", "tests.cuda_rehearsal", stage], cwd=ws, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        (ws / "params.yaml").write_text(original)


STAGE1_VARIANTS = {
    "lora": {},  # flips (flip_prob 0.5), validation images every 3 steps, prior preservation
    "lora_text_encoder": {"train.train_text_encoder": True},
    "full": {"train.method": "full"},
    "custom_diffusion": {"train.method": "custom_diffusion", "train.train_token_embedding": True},
    "textual_inversion": {"train.method": "textual_inversion"},
    "momentum_ti": {"train.method": "momentum_ti", "train.ti_steps": 2},
    "sdxl_lora_both_encoders": {"common.model": "embedded:tiny-sdxl", "train.train_text_encoder": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(STAGE1_VARIANTS))
@pytest.mark.xdist_group("reference")  # the session's reference run
def test_stage1_trains_with_every_model_on_cuda(trained, variant):
    """Every step of stage 1 (flipped views, validation images, prior preservation, each method) with the
    models on a fake ``cuda`` device: a CPU tensor mixed into a CUDA op stops it, as on a GPU. Before the fix
    the flip mask did (FakeTensorDeviceMismatchError at the first step), and the per-step loss went to
    ``accelerator.reduce`` on the CPU (which NCCL refuses)."""
    ws, env = trained
    proc = _rehearse(ws, env, "train_stage1_appearance", **STAGE1_VARIANTS[variant])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rehearsed train_stage1_appearance" in proc.stdout
    params = yaml.safe_load((ws / "params.yaml").read_text())["train"]
    if variant == "lora":  # latents drawn from the cached posteriors at every step: instance and class halves
        assert f"latents drawn {2 * params['steps']} times" in proc.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("reference")  # the session's reference run
def test_stage2_trains_with_every_model_on_cuda(trained):
    ws, env = trained
    proc = _rehearse(ws, env, "train_stage2_pose")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rehearsed train_stage2_pose" in proc.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("reference")  # the session's reference run
def test_sampling_runs_with_every_model_on_cuda(trained):
    ws, env = trained
    proc = _rehearse(ws, env, "sample")
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((ws / "samples/index.json").read_text())
    assert {r["pose"] for r in index["images"]} > {None}  # posed (ControlNet) and pose-free images were made


@pytest.mark.slow
@pytest.mark.xdist_group("reference")  # the session's reference run
def test_the_rehearsal_stops_on_a_cpu_tensor_mixed_into_cuda_ops(trained):
    """The rehearsal itself: a CPU mask mixed with the latents (the old flip bug) fails it."""
    ws, env = trained
    script = ws / "stages/train_stage1_appearance.py"
    original = script.read_text()
    fixed = "flip_mask = flip.view(-1, 1, 1, 1).to(loss_map.device)"
    assert fixed in original
    script.write_text(original.replace(fixed, "flip_mask = flip.view(-1, 1, 1, 1)"))
    try:
        proc = _rehearse(ws, env, "train_stage1_appearance")
    finally:
        script.write_text(original)
    assert proc.returncode != 0 and "FakeTensorDeviceMismatchError" in proc.stderr


# --- several processes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_follow_the_single_process_lr_schedule():
    """accelerate steps the schedule once per process at each optimizer step: with the schedule built N
    times longer, step k of two gloo processes has the learning rate of step k of one process (warm-up,
    linear, cosine, with gradient accumulation). Before the fix the two-process run warmed up and decayed
    twice as fast (cosine turned back up halfway)."""
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=600)
    one = subprocess.run([sys.executable, "-m", "tests.lr_worker"], **run)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "-m", "tests.lr_worker"], **run)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    single, double = json.loads(one.stdout), json.loads(two.stdout)
    assert single == double
    assert single["linear x1"][-1] == 0.0 and max(single["cosine x1"]) == single["cosine x1"][2]  # warm-up of 3


class _RecordingAccelerator:
    """What ``reduce_losses`` sees: where the tensor it reduces lives."""

    device = torch.device("meta")

    def reduce(self, tensor, reduction):
        self.seen = (tensor.device, reduction)
        return torch.zeros(tensor.shape)


def test_the_per_step_loss_is_reduced_on_the_accelerator_device():
    """NCCL reduces CUDA tensors only: the losses go to ``accelerator.device`` (a meta device here) first."""
    accelerator = _RecordingAccelerator()
    reduced = training.reduce_losses(accelerator, torch.tensor([1.0, 2.0, 3.0]))
    assert accelerator.seen == (torch.device("meta"), "mean") and reduced.device.type == "cpu"


# --- fp16 resume ------------------------------------------------------------------------------------------------


def test_the_fp16_gradient_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """The loss scale and growth tracker after some steps (one with an overflow) come back from a checkpoint,
    so a resumed fp16 run scales and skips steps exactly as the uninterrupted one would."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for x in (1.0, 1.0, float("inf"), 1.0):  # two good steps grow the scale, the overflow halves it, one more
        optimizer.zero_grad()
        scaler.scale(model(torch.full((1, 2), x)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**10 and saved["_growth_tracker"] == 1  # x2, then /2, then one good step
    trainable = dict(model.named_parameters())
    checkpoints.save(tmp_path / "ckpt", 4, trainable, optimizer, lr_scheduler, torch.Generator(), [], scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    checkpoints.load(tmp_path / "ckpt", trainable, optimizer, lr_scheduler, torch.Generator(), fresh)
    assert fresh.state_dict() == saved


# --- latents from the cached posterior, encoded in chunks --------------------------------------------------------


@pytest.fixture(scope="module")
def vae(tiny_sd):
    return load_components("embedded:tiny-sd15").vae


def test_latents_are_drawn_from_the_cached_posterior_bit_identically_for_a_seed(vae):
    """The cache holds the posterior's scaled mean and std; a draw is mean + std·ε with ε from the seeded CPU
    generator, so each step draws new latents (as an encoder called every step would) and a seed repeats."""
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    posterior = encode_posterior(vae, pixels)
    dist = vae.encode(pixels).latent_dist
    scale = vae.config.scaling_factor
    assert torch.allclose(posterior.mean, dist.mean * scale, atol=1e-6)
    assert torch.allclose(posterior.std, dist.std * scale, atol=1e-6) and bool((posterior.std > 0).all())
    g = torch.Generator().manual_seed(7)
    first, second = posterior.sample(g), posterior.sample(g)
    eps = torch.randn((1, 3, 4, 4, 4), generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(first, posterior.mean + posterior.std * eps)
    assert not torch.equal(first, second)  # a new draw at every step
    assert torch.equal(posterior.sample(torch.Generator().manual_seed(7)), first)  # bit-identical for a seed
    # two processes draw the whole global batch and keep their own half: together, one process's draw
    halves = [posterior.sample(torch.Generator().manual_seed(7), (rank, 2)) for rank in range(2)]
    assert torch.equal(halves[0], first) and not torch.equal(halves[1], first)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_the_vae_batch_size_does_not_change_the_latents(vae, batch_size):
    """Photos and class images are encoded ``vae_batch_size`` at a time (a real VAE on 200 class images at once
    needs tens of GB); the result equals one call on all of them, to float rounding (batched CPU convolutions
    differ in the last bits: measured 1.6e-7)."""
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = encode_posterior(vae, pixels, batch_size=5)
    chunked = encode_posterior(vae, pixels, batch_size=batch_size)
    assert chunked.mean.shape == whole.mean.shape == (5, 4, 4, 4)
    assert torch.allclose(chunked.mean, whole.mean, atol=1e-5) and torch.allclose(chunked.std, whole.std, atol=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")  # the session's reference run
def test_posebooth_generate_makes_the_same_images_in_any_batch_size(trained):
    """``posebooth generate --num-images 3`` in batches of 1 and of 3 (and the default, sample.batch_size):
    every image has its own seeded generator, so batching changes nothing but the memory it needs."""
    ws, env = trained
    made = {}
    for size in ("1", "3", None):
        out = f"gen_{size}"
        cmd = [sys.executable, "-m", "posebooth", "generate", "a photo of {identifier} {class_noun}", "--num-images",
               "3", "--pose", "data/target_poses/standing.json", "--out", out] + (["--batch-size", size] if size else [])  # fmt: skip
        proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        files = sorted((ws / out).glob("*.png"))
        assert len(files) == 3
        made[size] = [np.asarray(Image.open(f), dtype=np.int16) for f in files]
    for size in ("3", None):
        for a, b in zip(made["1"], made[size], strict=True):
            assert np.abs(a - b).max() <= 1  # 8-bit rounding of float differences of batched convolutions
    assert np.abs(made["1"][0] - made["1"][1]).max() > 10  # the seeds differ


# --- what a saved model starts from and keeps ---------------------------------------------------------------------


def test_a_from_unet_controlnet_starts_from_the_fp32_weights_under_half_precision(tiny_sd):
    """``train_pose.controlnet: from_unet`` with ``common.precision: bf16``: the ControlNet copies the base UNet's
    stored (fp32) weights, not the bf16-rounded ones the stage loaded for its frozen UNet."""
    fp32 = load_components("embedded:tiny-sd15").unet
    half = load_components("embedded:tiny-sd15", precision="bf16").unet
    controlnet = load_controlnet("from_unet", half, "cpu", "fp32", base="embedded:tiny-sd15")
    assert controlnet.dtype == torch.float32
    assert torch.equal(controlnet.conv_in.weight, fp32.conv_in.weight)
    down = controlnet.down_blocks[0].resnets[0].conv1.weight
    assert torch.equal(down, fp32.down_blocks[0].resnets[0].conv1.weight)
    assert not torch.equal(down, half.down_blocks[0].resnets[0].conv1.weight.float())  # rounding was visible


def test_full_fine_tune_keeps_the_base_models_own_scheduler(tmp_path, tiny_sd):
    """``train.method: full`` saves a whole pipeline; it keeps the base model's sampling scheduler (SD 1.5 ships
    PNDM), as train_dreambooth.py does, so ``from_pretrained(models/stage1)`` samples like the base model."""
    import shutil

    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from posebooth import config, methods

    base = tmp_path / "base"
    shutil.copytree(tiny_sd, base)
    PNDMScheduler.from_config(json.loads((base / "scheduler/scheduler_config.json").read_text())).save_pretrained(
        base / "scheduler"
    )
    comp = load_components(str(base))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["train"] | {"method": "full"}
    methods.save("full", comp, tmp_path / "out", config.build_section("train", params), "sks")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)
    assert type(pipe.scheduler) is PNDMScheduler


# --- out of memory ------------------------------------------------------------------------------------------------


def test_cuda_out_of_memory_ends_a_stage_with_one_line_naming_the_savers(monkeypatch, caplog, capsys):
    """A CUDA out-of-memory error ends the stage with one line: the stage, the GPU's memory and what it had
    allocated, and the params that lower it; no traceback."""

    def main():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(outputs, "cuda_memory", lambda: (16 * 2**30, int(15.5 * 2**30)))
    monkeypatch.setattr(sys, "argv", ["stages/train_stage1_appearance.py"])
    monkeypatch.delenv("POSEBOOTH_DEBUG", raising=False)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        outputs.run_stage(main)
    assert stop.value.code == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith("train_stage1_appearance: out of GPU memory (the GPU has 16.0 GiB")
    assert "15.5 GiB allocated" in line
    for saver in ("train.gradient_checkpointing: true", "train.optimizer: adamw_8bit", "train.batch_size",
                  "common.precision", "train.vae_batch_size"):  # fmt: skip
        assert saver in line
    assert "Traceback" not in capsys.readouterr().err


def test_out_of_memory_in_sampling_names_its_own_savers():
    line = outputs.out_of_memory_message("sample", None)
    assert "sample.cpu_offload: true" in line and "sample.batch_size" in line and "train." not in line


# --- half precision, end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_whole_pipeline_runs_in_bf16_with_validation_images(tmp_path, tiny_sd, monkeypatch):
    """`dvc repro` with ``common.precision: bf16`` (what the CPU can run of half precision; fp16 is GPU-only) and
    validation images every 3 steps, through the GPU check's own pipeline check (benchmarks/gpu_check.py, whose
    dry run in tests/test_benchmarks.py then leaves it out). Before the fix, stage 1's first validation stopped
    with "Input type (float) and bias type (c10::BFloat16) should be the same": it ran outside autocast."""
    from posebooth import embedded
    from tests.workspace import gpu_check_module, own_cache

    for name, value in own_cache(tmp_path, "bf16", str(embedded.cache_root())).items():  # its cache, its `dvc`
        monkeypatch.setenv(name, value)
    result = gpu_check_module().pipeline_check(tmp_path, "cpu", "bf16", dry_run=True)
    assert result["ok"], result
    ws = tmp_path / "pipeline-bf16"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["common"]["precision"] == "bf16" and params["train"]["flip_prob"] > 0
    assert params["train"]["validation_every"] == 3
    validation = sorted((ws / "plots/train_stage1_appearance/plots/images").glob("validation_*/*.png"))
    assert len(validation) == 2 * (params["train"]["steps"] // 3)  # two prompts at steps 3 and 6
    assert any(np.asarray(Image.open(f)).std() > 0 for f in validation)  # images, not blank frames
    for stage in ("train_stage1_appearance", "train_stage2_pose"):
        loss = json.loads((ws / f"metrics/{stage}.json").read_text())["loss"]
        assert np.isfinite(loss) and loss > 0
    assert len(json.loads((ws / "samples/index.json").read_text())["images"]) > 0
