"""The benchmark scripts run and print their tables (tiny settings here; the figures come from full runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.workspace import gpu_check_module


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_speed_prints_ratios(tiny_sd):
    out = _run("benchmarks/train_speed.py", "--steps", "2", "--warmup", "1", "--repeats", "1",
               "--variants", "posebooth", "encode_every_step")  # fmt: skip
    assert "| posebooth |" in out and "| encode_every_step |" in out
    assert "posebooth vs encode-every-step:" in out and "the peak memory" in out


@pytest.mark.slow
def test_train_speed_on_the_tiny_sdxl_with_the_16gb_savers(tiny_sd):
    out = _run("benchmarks/train_speed.py", "--steps", "2", "--warmup", "1", "--repeats", "1", "--model",
               "embedded:tiny-sdxl", "--variants", "posebooth", "checkpointing_8bit")  # fmt: skip
    assert "embedded:tiny-sdxl" in out and "| checkpointing_8bit |" in out


@pytest.mark.slow
def test_class_priors_speed_prints_the_ratio(tiny_sd):
    out = _run("benchmarks/class_priors_speed.py", "--images", "2", "--batch", "2", "--repeats", "1")
    assert "batched vs one at a time:" in out and "largest pixel difference" in out


def test_committed_sd15_configs_build_the_published_parameter_counts():
    from accelerate import init_empty_weights

    gpu_check = gpu_check_module()
    configs = gpu_check.load_configs()
    assert gpu_check.model_index_problems(configs) == []
    with init_empty_weights():  # on the meta device: no 4 GB of random weights
        modules = gpu_check.sd15_modules(configs)
    assert all(p.device.type == "meta" for m in modules.values() for p in m.parameters())
    # SD 1.5's published sizes: UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text encoder 123.06 M.
    assert gpu_check.parameter_counts(modules) == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    unet = modules["unet"].config
    assert unet.cross_attention_dim == 768 and tuple(unet.block_out_channels) == (320, 640, 1280, 1280)


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check(tiny_sd):
    """The dry run without its two pipeline checks: their code (``pipeline_check``) runs in
    tests/test_gpu_paths.py's bf16 pipeline test, and the fp32 pipeline is the session's reference run."""
    checks = ["sd15-model", "speed-posebooth", "speed-reference"]
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--keep-cache", "--checks", *checks],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| `")]
    results = {cells[0].split("`")[1]: cells[1] for cells in rows}  # check name -> result
    names = [*checks, "ratio"]
    assert list(results) == names, proc.stdout + proc.stderr[-3000:]
    assert set(results.values()) == {"passed"} and proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "STAND-IN for train_dreambooth_lora.py" in proc.stdout  # the stand-in is labelled as one


def test_world_ceiling_scores_photos_and_their_round_trip(tmp_path):
    """The world's identity ceiling: its photos pass the calibrated threshold, and the VAE round trip scores lower
    (a leave-one-out that kept the photo itself among the references would score the clean photos 1.0 more often
    and the round trip near them)."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for path in sorted((ROOT / "data" / "subject").glob("*.[jp][pn]g")):
        with Image.open(path) as im:
            side = min(im.size)
            box = ((im.width - side) // 2, (im.height - side) // 2)
            im.convert("RGB").crop((*box, box[0] + side, box[1] + side)).resize((64, 64)).save(
                tmp_path / "images" / f"{path.stem}.png"
            )
    out = _run("benchmarks/world_ceiling.py", "--prepared", str(tmp_path))
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()[2:]}
    photos, trip = rows["the photos themselves"], rows["their VAE round trip"]
    assert photos[0] == trip[0] == "6"
    assert float(photos[4]) == 1.0 and 0.8 < float(photos[1]) < 0.99  # verified; mean score of a true leave-one-out
    assert float(trip[1]) < float(photos[1]) - 0.03


def test_world_ceiling_leaves_each_photo_out_of_its_references():
    """Orthogonal embeddings: each is unlike every other, so its leave-one-out score is 0 (1/n if it met itself)."""
    import torch

    ceiling = _benchmark("world_ceiling")
    basis = torch.eye(4)
    assert torch.allclose(ceiling.leave_one_out(basis, basis), torch.zeros(4))
    near = basis + 0.5 * torch.roll(basis, 1, dims=0)  # query i leans towards reference i - 1 only
    assert torch.allclose(ceiling.leave_one_out(near, basis), torch.full((4,), (1 / 5**0.5) / 3))


def test_dora_row_scale_measures_each_output_row(tmp_path):
    """benchmarks/dora_row_scale.py on a tiny-model DoRA: one ratio per output row of every adapted module (a
    column-wise norm would count input columns), all 1 while the low-rank part is zero, not once it is trained."""
    import json

    from posebooth import methods
    from tests.test_adapters import _adapted, _randomise, _setup

    comp, t, trainable = _setup("embedded:tiny-sd15", "dora")
    common = {"identifier": "sks", "class_noun": "robot", "model": "embedded:tiny-sd15", "resolution": 32}
    rows = sum(
        m.get_base_layer().weight.shape[0]
        for p in ("unet", "text_encoder")
        for m in _adapted(getattr(comp, p)).values()
    )
    for folder, trained in ((tmp_path / "fresh", False), (tmp_path / "trained", True)):
        if trained:
            _randomise(trainable)
        methods.save("lora", comp, folder, t, "sks")
        (folder / "provenance.json").write_text(json.dumps({"params": {"common": common}}))
        out = _run("benchmarks/dora_row_scale.py", str(folder)).split()
        assert out[:2] == ["rows", str(rows)]
        mean, low, high = (float(out[out.index(k) + 1]) for k in ("mean", "min", "max"))
        assert (mean, low, high) == (1.0, 1.0, 1.0) if not trained else high > 1.01


def _benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_world_rebuild_finds_the_changed_weights(tmp_path):
    """benchmarks/world_rebuild.py's weight table: a copy of the committed base is byte-identical file by file,
    and one weight moved by 0.25 shows in its own file only, by that much."""
    import shutil

    from safetensors.torch import load_file, save_file

    rebuild = _benchmark("world_rebuild")
    shutil.copytree(ROOT / "world" / "base", tmp_path / "base")
    unet = tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet)
    key = sorted(weights)[3]
    weights[key].view(-1)[0] += 0.25
    save_file(weights, unet)
    rows = {
        name: (same, diff) for name, same, diff in rebuild.compare_weights(tmp_path / "base", ROOT / "world" / "base")
    }
    assert len(rows) == 3
    assert rows.pop("base/unet/diffusion_pytorch_model.safetensors") == (False, pytest.approx(0.25, abs=1e-3))
    assert all(v == (True, 0.0) for v in rows.values()), rows


def test_world_rebuild_claims_hold_on_the_committed_metrics_and_fail_on_broken_ones():
    """The rebuild's pass mark is the guard's claims: all hold on the committed metrics; a stage-2 ControlNet
    that follows poses worse than the pretrained one, or a stage 1 that learns nothing, fails its claim."""
    import copy
    import json

    rebuild = _benchmark("world_rebuild")
    committed = json.loads((ROOT / "metrics" / "evaluate.json").read_text())
    assert all(rebuild.claims(committed).values())
    no_pose = copy.deepcopy(committed)
    no_pose["pose_adherence"]["pck_0.2"] = committed["pretrained_controlnet"]["pose_adherence"]["pck_0.2"] - 0.1
    failed = [name for name, ok in rebuild.claims(no_pose).items() if not ok]
    assert failed == ["stage 2 >= pretrained ControlNet - 0.05", "issue 16: PCK@0.2 >= 0.85"], failed
    no_subject = copy.deepcopy(committed)
    no_subject["pose_free"]["dino"]["mean"] = committed["base_model"]["dino"]["mean"]
    assert [name for name, ok in rebuild.claims(no_subject).items() if not ok] == [
        "stage 1 learns the subject: DINO > base + 0.1"
    ]
