"""The pose steers sampling, through the code stages/sample.py runs (``subject.trained_pipelines`` and
``generation.generate``): another pose gives another image; conditioning scale 0, or a control window that
holds no step, gives the pose-free image; and the images are a stock ``StableDiffusionControlNetPipeline``'s.

``ControlNetModel.from_unet`` (the embedded tiny ControlNet) leaves the zero convolutions at exactly 0, so no
pose could change anything: the ControlNet here gets random ones, from a seeded generator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from PIL import Image
from tqdm import tqdm

from posebooth import cli, outputs, subject
from posebooth.generation import generate
from posebooth.models import load_components, load_controlnet
from posebooth.poses import load_pose, render_pose
from tests.conftest import ROOT
from tests.profile import apply_profile
from tests.test_lora import _random_lora

SIZE = 32
RENDER_SIZE = 512  # extract_poses.render_size of the test profile
PROMPTS = ["a photo of sks robot", "a sks robot in the snow"]
SEEDS = [0, 1]
COMMON = dict(steps=3, guidance_scale=6.0, resolution=SIZE, negative_prompt="blurry")


def randomise_controlnet(controlnet, seed: int):
    """Random zero convolutions (the pose encoder's ``conv_out``, ``controlnet_down_blocks``,
    ``controlnet_mid_block``), and a pose encoder that passes the pose on (He-initialised convolutions, x2):
    with PyTorch's default initialisation the thin sticks of a 32 px pose map reach the 4x4 latents about
    10^4 times weaker than the encoder's biases, and the images of two poses differ by 1/255."""
    g = torch.Generator().manual_seed(seed)
    encoder = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (encoder.conv_in, *encoder.blocks):
            conv.weight.normal_(std=2 * math.sqrt(2 / conv.weight[0].numel()), generator=g)
            conv.bias.zero_()
        for conv in (encoder.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            conv.weight.normal_(std=1 / math.sqrt(conv.weight[0].numel()), generator=g)
            conv.bias.zero_()
    return controlnet


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """models/stage1 (a random subject LoRA) and models/stage2 (the randomised ControlNet) in a folder."""
    root = tmp_path_factory.mktemp("conditioning")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # peft draws the LoRA's A matrices from the global generator
        _random_lora(root / "stage1", alpha=4.0, std=0.2, seed=1)
    controlnet = randomise_controlnet(load_controlnet("embedded:tiny-sd15-openpose"), seed=0)
    controlnet.save_pretrained(root / "stage2" / "controlnet", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def pipelines(trained):
    """sample's ``(posed, free)`` pipelines."""
    comp = load_components("embedded:tiny-sd15")
    return subject.trained_pipelines(comp, str(trained / "stage1"), str(trained / "stage2"), "ddim", "cpu", "fp32",
                                     False)  # fmt: skip


@pytest.fixture(scope="module")
def pose_maps() -> dict[str, Image.Image]:
    return {name: render_pose(load_pose(ROOT / "data" / "target_poses" / f"{name}.json"), SIZE, RENDER_SIZE)
            for name in ("standing", "arms_up")}  # fmt: skip


def pixels(images: list[Image.Image]) -> np.ndarray:
    """Images as one (N, H, W, 3) int16 array, so that differences do not wrap around."""
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def posed(pipelines, pose_maps, pose: str = "standing", **kwargs) -> np.ndarray:
    """The prompts in ``pose`` (one seed each), as sample makes them."""
    control = [pose_maps[pose]] * len(SEEDS)
    return pixels(generate(pipelines[0], PROMPTS, SEEDS, control_image=control, **COMMON, **kwargs))


@pytest.fixture(scope="module")
def reference(pipelines, pose_maps) -> dict[str, np.ndarray]:
    """The pose-free images and the images in the standing pose, at scale 1 over all steps."""
    return {"free": pixels(generate(pipelines[1], PROMPTS, SEEDS, **COMMON)),
            "standing": posed(pipelines, pose_maps)}  # fmt: skip


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_a_pose_changes_the_image_and_another_pose_another(pipelines, pose_maps, reference):
    assert diff(reference["standing"], reference["free"]) > 20
    assert diff(posed(pipelines, pose_maps, "arms_up"), reference["standing"]) > 20


def test_conditioning_scale_0_gives_the_pose_free_image(pipelines, pose_maps, reference):
    assert diff(posed(pipelines, pose_maps, conditioning_scale=0.0), reference["free"]) <= 1
    half = posed(pipelines, pose_maps, conditioning_scale=0.5)  # a scale in between: neither of the two
    assert diff(half, reference["free"]) > 10 and diff(half, reference["standing"]) > 10


def test_the_control_guidance_window_is_honoured(pipelines, pose_maps, reference):
    """With 3 steps, step i is steered when ``start <= i/3`` and ``(i+1)/3 <= end``."""
    assert diff(posed(pipelines, pose_maps, control_guidance=(0.9, 1.0)), reference["free"]) <= 1  # no step
    first_step = posed(pipelines, pose_maps, control_guidance=(0.0, 0.34))
    assert diff(first_step, reference["free"]) > 10 and diff(first_step, reference["standing"]) > 10


def test_posed_images_are_the_stock_controlnet_pipelines(tiny_sd, trained, pipelines, pose_maps):
    """The same call through ``StableDiffusionControlNetPipeline`` with the LoRA loaded the stock way, each
    prompt in its own pose, conditioning scale and window away from their defaults."""
    stock = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd, controlnet=ControlNetModel.from_pretrained(trained / "stage2" / "controlnet"),
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)  # sample.scheduler: ddim
    stock.load_lora_weights(str(trained / "stage1"))
    stock.set_progress_bar_config(disable=True)
    control = [pose_maps["standing"], pose_maps["arms_up"]]
    expected = stock(PROMPTS, negative_prompt=["blurry"] * 2, image=control, num_inference_steps=3,
                     guidance_scale=6.0, height=SIZE, width=SIZE, controlnet_conditioning_scale=0.7,
                     control_guidance_start=0.0, control_guidance_end=0.34,
                     generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images  # fmt: skip
    got = generate(pipelines[0], PROMPTS, SEEDS, control_image=control, conditioning_scale=0.7,
                   control_guidance=(0.0, 0.34), **COMMON)  # fmt: skip
    assert diff(pixels(got), pixels(expected)) <= 2
    assert diff(pixels(got), posed(pipelines, pose_maps, conditioning_scale=0.7, control_guidance=(0.0, 0.34))) > 10


def test_one_pose_map_serves_a_whole_batch(pipelines, pose_maps, reference):
    """generate_class_priors (pose-paired) passes one pose map for a batch of seeds: each image is the one
    that pose map gives it alone."""
    one = pixels(generate(pipelines[0], PROMPTS, SEEDS, control_image=pose_maps["standing"], **COMMON))
    assert diff(one, reference["standing"]) == 0


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.0, 0.34)])
def test_posebooth_generate_with_a_pose_samples_like_sample(trained, pipelines, pose_maps, tmp_path, monkeypatch,
                                                            window):  # fmt: skip
    """``posebooth generate --pose`` with the sample section's settings (conditioning scale, control window)
    makes the images sample makes, the pose drawn like sample's."""
    from posebooth import cli

    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["sample"].update(conditioning_scale=0.5, negative_prompt="blurry", guidance_scale=6.0, scheduler="ddim",
                            control_guidance_start=window[0], control_guidance_end=window[1])  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(outputs, "run_stage", lambda main, name=None: main())  # no process-wide settings
    cli.main(["--params", str(tmp_path / "params.yaml"), "generate", PROMPTS[0], "--num-images", "2",
              "--pose", str(ROOT / "data" / "target_poses" / "standing.json"), "--stage1", str(trained / "stage1"),
              "--stage2", str(trained / "stage2"), "--out", str(tmp_path / "gen")])  # fmt: skip
    made = pixels([Image.open(p).convert("RGB") for p in sorted((tmp_path / "gen").glob("*.png"))])
    expected = generate(pipelines[0], PROMPTS[0], SEEDS, control_image=pose_maps["standing"], conditioning_scale=0.5,
                        control_guidance=window, **COMMON)  # fmt: skip
    assert made.shape[0] == 2 and diff(made, pixels(expected)) == 0


def _generate_cli(trained, tmp_path, monkeypatch, out: str, *args: str, detector: str = "sidecar") -> list[Image.Image]:
    """``posebooth generate PROMPTS[0] ARGS`` with the test profile and sample's settings of ``COMMON``; the images
    it wrote to ``out``, in seed order."""
    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["sample"].update(negative_prompt="blurry", guidance_scale=6.0, scheduler="ddim")
    params["extract_poses"]["detector"] = detector
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(outputs, "run_stage", lambda main, name=None: main())  # no process-wide settings
    cli.main(["--params", str(tmp_path / "params.yaml"), "generate", PROMPTS[0], "--stage1", str(trained / "stage1"),
              "--stage2", str(trained / "stage2"), "--out", str(tmp_path / out), *args])  # fmt: skip
    files = sorted((tmp_path / out).glob("*.png"), key=lambda p: int(p.stem.rsplit("_s", 1)[1]))
    return [Image.open(p).convert("RGB") for p in files]


def test_posebooth_generate_without_a_pose_loads_no_controlnet_and_batches_by_seed(trained, pipelines, tmp_path,
                                                                                  monkeypatch, capsys):  # fmt: skip
    """Without ``--pose`` the stage-2 ControlNet is never loaded (nor need stage 2 exist); ``--num-images 3`` gives
    seeds 0, 1, 2 as sample's pose-free pipeline makes them, whatever ``--batch-size``; a bar counts the images."""

    def no_controlnet(*args, **kwargs):
        raise AssertionError("the stage-2 ControlNet was loaded without --pose")

    class Bar(tqdm):  # the tests' TQDM_DISABLE=1 turned off
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs | {"disable": False})

    monkeypatch.setattr(subject, "load_stage2_controlnet", no_controlnet)
    monkeypatch.setattr(cli, "tqdm", Bar)
    one = _generate_cli(trained, tmp_path, monkeypatch, "one", "--num-images", "3", "--batch-size", "1",
                        "--stage2", str(tmp_path / "no_stage2"))  # fmt: skip
    assert "generate: 100%|██████████| 3/3" in capsys.readouterr().err
    three = _generate_cli(trained, tmp_path, monkeypatch, "three", "--num-images", "3", "--batch-size", "3")
    expected = generate(pipelines[1], PROMPTS[0], [0, 1, 2], **COMMON)
    assert len(one) == len(three) == 3
    assert diff(pixels(one), pixels(expected)) <= 1 and diff(pixels(three), pixels(expected)) <= 1  # batched: rounding
    assert diff(pixels(one[:1]), pixels(one[1:2])) > 10  # the seeds differ


def test_posebooth_generate_at_a_width_and_height_from_keypoints_a_pose_map_or_a_photo(trained, tmp_path, monkeypatch):
    """``--width 48 --height 32``: the image has that size; ``--pose-map`` (the map ``--pose`` draws, saved) and
    ``--pose`` on a photo (read by the detector) give the image ``--pose`` on the keypoints gives."""
    from posebooth import detectors
    from posebooth.poses import render_pose_size

    standing = ROOT / "data" / "target_poses" / "standing.json"
    size = ("--width", "48", "--height", "32")
    keypoints = _generate_cli(trained, tmp_path, monkeypatch, "keypoints", "--pose", str(standing), *size)
    assert [im.size for im in keypoints] == [(48, 32)]
    render_pose_size(load_pose(standing), 48, 32, RENDER_SIZE).save(tmp_path / "map.png")
    pose_map = _generate_cli(trained, tmp_path, monkeypatch, "map", "--pose-map", str(tmp_path / "map.png"), *size)
    assert diff(pixels(pose_map), pixels(keypoints)) == 0

    Image.new("RGB", (40, 40), "grey").save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match=r"photo.png: reading a pose .* or extract_poses.detector"):
        _generate_cli(trained, tmp_path, monkeypatch, "photo", "--pose", str(tmp_path / "photo.png"))  # sidecar

    class Detector:
        def detect(self, image):
            return load_pose(standing)

    monkeypatch.setattr(detectors, "make_detector", lambda name, cfg, device: Detector())
    photo = _generate_cli(trained, tmp_path, monkeypatch, "photo", "--pose", str(tmp_path / "photo.png"), *size,
                          detector="world")  # fmt: skip
    assert diff(pixels(photo), pixels(keypoints)) == 0
