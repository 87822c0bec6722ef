"""The world's pose detector: a small heatmap network that finds a robot's OpenPose-18 keypoints or a dog's
quadruped keypoints again on 64 px images, so that pose adherence can be measured on the world's samples.

The network is fully convolutional, a three-level encoder with a top-down path back to stride 2 (a small
feature pyramid, Lin et al. 2017): 64x64 RGB in, one 32x32 heatmap per keypoint of both skeletons (18
robot channels, then 13 dog channels) and three class logits (robot, dog, nothing) from the pooled
coarsest features. Targets are Gaussians of ``sigma`` heatmap pixels at each visible keypoint (Tompson et
al. 2014); absent keypoints and the other class's channels are all zero. The heatmaps are sigmoids trained
with binary cross-entropy against these soft targets, the pixels near a keypoint weighted up: with plain
squared error the heatmaps of so small a network, trained this briefly, sank to zero everywhere (held-out
PCK@0.2 0.07 after 600 steps, against 0.99 with the weighted cross-entropy). Decoding takes the peak of
each heatmap and refines it to sub-pixel precision by fitting a parabola to the log heatmap along each
axis, which is exact for a Gaussian peak (DARK, Zhang et al. 2020).

It is trained on its own renders of the world (every class, every context, and empty backgrounds) under
augmentation that mimics what a small diffusion model makes of them: Gaussian blur, colour and contrast
shifts, pixel noise. ``train_pose_detector`` also measures it on renders of another seed, clean and
blurred. Coordinates: pixel ``i`` covers ``[i, i + 1)``; heatmap pixel ``j`` covers image pixels
``[2j, 2j + 2)`` and its centre lies at ``2j + 1``.

    detector = WorldPoseDetector("world/pose")
    pose = detector.detect(image)  # a Pose on the image's canvas, or None (a vase, nothing)
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from tqdm import tqdm

from posebooth.poses import OPENPOSE_18, Pose, Skeleton
from posebooth.world.dog import DOG_SKELETON

log = logging.getLogger(__name__)

FORMAT = "posebooth-world-posenet"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
CLASSES = ("robot", "dog", "nothing")  # the class head's outputs; "nothing": a vase or no subject
SKELETONS: dict[str, Skeleton] = {"robot": OPENPOSE_18, "dog": DOG_SKELETON}
# Heatmap channels of each class: the robot's 18, then the dog's 13.
CHANNELS = {"robot": slice(0, len(OPENPOSE_18.names)), "dog": slice(len(OPENPOSE_18.names), None)}
KEYPOINTS = len(OPENPOSE_18.names) + len(DOG_SKELETON.names)
# Left/right counterpart of every channel, for horizontal flips.
FLIP_ORDER = [*OPENPOSE_18.mirror_order(), *(len(OPENPOSE_18.names) + i for i in DOG_SKELETON.mirror_order())]

# What makes the world's pose detector: change a value, run `make world`, commit the result.
RECIPE = {
    "seed": 20261205,
    "threads": 1,  # one core: bit-identical at a fixed thread count
    "size": 64,  # input pixels
    "heatmap": 32,  # heatmap side (stride 2)
    "sigma": 1.0,  # target Gaussian, heatmap pixels
    "channels": [16, 32, 48, 64],  # network widths at strides 1, 2, 4, 8
    "scenes": 8000,  # training renders (robots, dogs, vases in every context; never the held-out subject)
    "empty": 0.05,  # share of the training renders that are backgrounds without a subject
    "steps": 2000,
    "batch": 32,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "warmup": 50,
    "positive_weight": 10.0,  # a heatmap pixel's cross-entropy counts 1 + this x its target
    "class_weight": 0.5,  # cross-entropy of the class head against the heatmaps' summed cross-entropy
    "flip": 0.5,  # probability of a horizontal flip (left and right keypoints swapped)
    "blur": 2.0,  # Gaussian blur sigma, uniform in [0, blur] pixels
    "coarse": 0.5,  # probability of an area-downsampling to 16-32 px and back up: the blobs a 16x16 latent decodes to
    "blotch": 0.08,  # low-frequency colour noise (a 4x4 field, upsampled), std uniform in [0, blotch]
    "brightness": 0.1,  # offset, uniform in [-b, b] (pixels in [0, 1])
    "contrast": 0.2,  # factor about the image's mean, uniform in [1 - c, 1 + c]
    "colour": 0.1,  # per-channel gain, uniform in [1 - c, 1 + c]
    "noise": 0.04,  # Gaussian pixel noise, std uniform in [0, noise]
    "threshold": 0.3,  # a keypoint whose heatmap peak is lower is absent
    "eval_seed": 20261206,  # held-out renders: another seed, never trained on
    "eval_scenes": 600,
    "eval_blur": 1.0,  # held-out renders blurred with this sigma (pixels) as well
}


def quick_recipe(recipe: dict) -> dict:
    """``recipe`` cut down to a few steps on a few scenes (what the tests and ``posebooth world pretrain --quick`` run)."""
    return recipe | {"scenes": 24, "steps": 2, "batch": 4, "warmup": 1, "eval_scenes": 12}


def check_recipe(recipe: dict) -> None:
    """A ValueError naming any key ``recipe`` lacks or has beyond ``RECIPE``'s, or a held-out seed equal to
    the training seed."""
    missing, unknown = sorted(set(RECIPE) - set(recipe)), sorted(set(recipe) - set(RECIPE))
    if missing or unknown:
        raise ValueError(f"pose detector recipe: missing keys {missing}, unknown keys {unknown}; see posenet.RECIPE")
    if recipe["eval_seed"] == recipe["seed"]:
        raise ValueError(f"pose detector recipe: eval_seed must differ from seed ({recipe['seed']})")
    if recipe["size"] % recipe["heatmap"]:
        raise ValueError(f"pose detector recipe: heatmap {recipe['heatmap']} must divide size {recipe['size']}")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PoseNet(nn.Module):
    """Heatmaps and class logits of 64x64 images.

    ``channels``: widths at strides 1, 2, 4 and 8; the heatmaps come out at stride 2 (32x32 for 64 px)."""

    def __init__(self, channels: list[int], keypoints: int = KEYPOINTS, classes: int = len(CLASSES)):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.config = {"channels": list(channels), "keypoints": keypoints, "classes": classes}
        self.stem = nn.Sequential(_conv(3, c1), _conv(c1, c2, 2), _conv(c2, c2))  # stride 2
        self.down1 = nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3))  # stride 4
        self.down2 = nn.Sequential(_conv(c3, c4, 2), _conv(c4, c4), _conv(c4, c4))  # stride 8
        self.lateral2, self.up1 = nn.Conv2d(c4, c3, 1), _conv(c3, c3)
        self.lateral1, self.up0 = nn.Conv2d(c3, c2, 1), nn.Sequential(_conv(c2, c2), _conv(c2, c2))
        self.heatmap_head = nn.Conv2d(c2, keypoints, 1)
        # start every heatmap near 0.02 rather than 0.5: the background dominates (RetinaNet's prior, Lin et
        # al. 2017), and a start at 0.5 spends the first steps unlearning it
        nn.init.constant_(self.heatmap_head.bias, -4.0)
        self.class_head = nn.Linear(2 * c4, classes)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` (B, 3, S, S) in [-1, 1] -> heatmap logits (B, K, S/2, S/2) (their sigmoids are the
        heatmaps, in [0, 1]) and class logits (B, 3)."""
        f2 = self.stem(pixels)  # (B, c2, S/2, S/2)
        f4 = self.down1(f2)  # (B, c3, S/4, S/4)
        f8 = self.down2(f4)  # (B, c4, S/8, S/8)
        u4 = self.up1(f4 + F.interpolate(self.lateral2(f8), scale_factor=2, mode="bilinear"))
        u2 = self.up0(f2 + F.interpolate(self.lateral1(u4), scale_factor=2, mode="bilinear"))
        pooled = torch.cat([f8.mean(dim=(2, 3)), f8.amax(dim=(2, 3))], dim=1)  # (B, 2 c4)
        return self.heatmap_head(u2), self.class_head(pooled)


def heatmap_targets(xy: torch.Tensor, visible: torch.Tensor, size: int, heatmap: int, sigma: float) -> torch.Tensor:
    """Gaussian target heatmaps (B, K, H, H) in [0, 1] of keypoints ``xy`` (B, K, 2), pixels of a ``size``
    image; a channel whose ``visible`` (B, K) is False is all zero."""
    stride = size / heatmap
    centres = xy / stride - 0.5  # heatmap pixel j's centre is image pixel stride * (j + 0.5)
    grid = torch.arange(heatmap, dtype=xy.dtype)
    gx = torch.exp(-((grid - centres[..., 0:1]) ** 2) / (2 * sigma**2))  # (B, K, H) along x
    gy = torch.exp(-((grid - centres[..., 1:2]) ** 2) / (2 * sigma**2))  # (B, K, H) along y
    return gy[..., :, None] * gx[..., None, :] * visible[..., None, None]


def decode_heatmaps(heatmaps: torch.Tensor, width: int, height: int) -> np.ndarray:
    """(K, 3) keypoints of ``heatmaps`` (K, H, W): x and y in pixels of a ``width`` x ``height`` image, and
    the peak value. The peak pixel is refined along each axis by the vertex of the parabola through the log
    heatmap at it and its two neighbours (exact for a Gaussian; DARK, Zhang et al. 2020), by at most half a
    pixel; on the border it is not refined."""
    heatmaps = heatmaps.detach().float().cpu()
    k, h, w = heatmaps.shape
    peak, index = heatmaps.reshape(k, -1).max(dim=1)
    row, col = index // w, index % w
    logs = heatmaps.clamp_min(1e-6).log()
    rows = torch.arange(k)

    def offset(minus: torch.Tensor, centre: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
        curvature = minus - 2 * centre + plus  # < 0 at a strict maximum
        safe = torch.where(curvature < 0, curvature, -torch.ones_like(curvature))
        return torch.where(curvature < 0, (minus - plus) / (2 * safe), 0.0).clamp(-0.5, 0.5)

    inner_x, inner_y = (col > 0) & (col < w - 1), (row > 0) & (row < h - 1)
    cl, cr = (col - 1).clamp(0, w - 1), (col + 1).clamp(0, w - 1)
    ru, rd = (row - 1).clamp(0, h - 1), (row + 1).clamp(0, h - 1)
    centre = logs[rows, row, col]
    dx = torch.where(inner_x, offset(logs[rows, row, cl], centre, logs[rows, row, cr]), 0.0)
    dy = torch.where(inner_y, offset(logs[rows, ru, col], centre, logs[rows, rd, col]), 0.0)
    x = (col.double() + dx.double() + 0.5) * width / w  # heatmap pixel centres to image pixels
    y = (row.double() + dy.double() + 0.5) * height / h
    return np.stack([x.numpy(), y.numpy(), peak.double().numpy()], axis=1)


def scene_keypoints(scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Training keypoints of ``scene`` in heatmap channel order: (K, 2) pixels of a ``size`` render and
    (K,) visibility (inside the image and of the scene's class; nothing for a vase)."""
    from posebooth.world.scenes import keypoints_xy

    xy, visible = np.zeros((KEYPOINTS, 2), np.float32), np.zeros(KEYPOINTS, bool)
    own = keypoints_xy(scene, size)
    if own is not None:
        channels = CHANNELS[scene.subject.kind]
        xy[channels] = own
        # as scenes.scene_pose: a keypoint on the image's edge is inside
        visible[channels] = (own[:, 0] >= 0) & (own[:, 0] <= size) & (own[:, 1] >= 0) & (own[:, 1] <= size)
    return xy, visible


def render_pose_scenes(seed: int, n: int, size: int, empty: float) -> dict:
    """``n`` random renders (never the held-out subject), a share ``empty`` of them backgrounds without
    their subject: "pixels" (N, 3, S, S) uint8, "xy" (N, K, 2) float32 pixels, "visible" (N, K) bool,
    "labels" (N,) index into ``CLASSES``, "scenes" and "empty" (N,) bool."""
    from posebooth.world import scenes as world

    rng = np.random.default_rng(seed)
    pixels, xy = np.zeros((n, size, size, 3), np.uint8), np.zeros((n, KEYPOINTS, 2), np.float32)
    visible, labels, is_empty, drawn = np.zeros((n, KEYPOINTS), bool), np.zeros(n, np.int64), np.zeros(n, bool), []
    for i in tqdm(range(n), desc="world: render pose scenes", unit="scene"):
        scene = world.sample_scene(rng)
        drawn.append(scene)
        is_empty[i] = rng.random() < empty
        if is_empty[i]:
            pixels[i], labels[i] = np.asarray(world.background(scene, size)), CLASSES.index("nothing")
            continue
        pixels[i] = np.asarray(world.render(scene, size)[0])
        xy[i], visible[i] = scene_keypoints(scene, size)
        labels[i] = CLASSES.index(scene.subject.kind) if scene.subject.kind in SKELETONS else CLASSES.index("nothing")
    return {
        "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        "xy": torch.from_numpy(xy),
        "visible": torch.from_numpy(visible),
        "labels": torch.from_numpy(labels),
        "scenes": drawn,
        "empty": is_empty,
    }


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) blurred by a Gaussian of ``sigmas`` (B,) pixels each (0: unchanged), separably
    with a 9-tap kernel and reflected borders."""
    b, c, h, w = images.shape
    taps = torch.arange(-4, 5, dtype=images.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigmas.clamp_min(1e-3)[:, None] ** 2))  # (B, 9)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B C, 9)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, 4, 4), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def augment(
    pixels: torch.Tensor, xy: torch.Tensor, visible: torch.Tensor, recipe: dict, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch as a small diffusion model might draw it: ``pixels`` (B, 3, S, S) uint8 flipped
    (keypoints mirrored, left and right swapped), blurred, coarsened, blotched, shifted in colour and contrast
    and noised.
    Returns pixels (B, 3, S, S) in [-1, 1], keypoints (B, K, 2) and visibility (B, K)."""
    b, size = len(pixels), pixels.shape[-1]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    x = pixels.float() / 255  # (B, 3, S, S) in [0, 1]
    flip = torch.rand(b, generator=generator) < recipe["flip"]
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    flipped_xy = torch.stack([size - xy[..., 0], xy[..., 1]], dim=-1)[:, FLIP_ORDER]
    xy = torch.where(flip[:, None, None], flipped_xy, xy)
    visible = torch.where(flip[:, None], visible[:, FLIP_ORDER], visible)
    x = gaussian_blur(x, uniform(0, recipe["blur"]))
    # Generated images are decoded from 16x16 latents: detail lost at a coarser size, colour in blotches.
    side = int(torch.randint(16, 33, (1,), generator=generator))
    coarse = F.interpolate(F.interpolate(x, size=(side, side), mode="area"), size=(size, size), mode="bilinear")
    x = torch.where((torch.rand(b, generator=generator) < recipe["coarse"])[:, None, None, None], coarse, x)
    field = torch.randn(b, 3, 4, 4, generator=generator) * uniform(0, recipe["blotch"], 1, 1, 1)
    x = x + F.interpolate(field, size=(size, size), mode="bilinear")
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(1 - recipe["contrast"], 1 + recipe["contrast"], 1, 1, 1) + mean
    x = x * uniform(1 - recipe["colour"], 1 + recipe["colour"], 3, 1, 1)
    x = x + uniform(-recipe["brightness"], recipe["brightness"], 1, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0, recipe["noise"], 1, 1, 1)
    return x.clamp(0, 1) * 2 - 1, xy, visible


def heatmap_loss(heatmap_logits: torch.Tensor, target: torch.Tensor, positive_weight: float) -> torch.Tensor:
    """Binary cross-entropy of heatmap logits (B, K, H, W) against soft targets (B, K, H, W) in [0, 1], each
    pixel weighted by ``1 + positive_weight * target``, summed over each heatmap and averaged over (B, K)."""
    weight = 1 + positive_weight * target
    per_pixel = F.binary_cross_entropy_with_logits(heatmap_logits, target, reduction="none")
    return (per_pixel * weight).sum(dim=(2, 3)).mean()


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_pose_detector(recipe: dict, out: Path) -> dict:
    """Train the pose detector from ``recipe`` (see ``RECIPE``), save it to ``out`` (``config.json`` and fp16
    ``model.safetensors``) and measure the saved detector on held-out renders, clean and blurred. Returns the
    record: seconds, final loss, held-out figures."""
    check_recipe(recipe)
    torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])  # the network's initial weights
    start = time.perf_counter()
    data = render_pose_scenes(recipe["seed"], recipe["scenes"], recipe["size"], recipe["empty"])
    generator = torch.Generator().manual_seed(recipe["seed"] + 1)
    model = PoseNet(recipe["channels"]).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, recipe["warmup"], recipe["steps"])
    )
    losses = []
    bar = tqdm(range(recipe["steps"]), desc="world: pose detector", unit="step")
    for step in bar:
        idx = torch.randint(0, len(data["labels"]), (recipe["batch"],), generator=generator)
        pixels, xy, visible = augment(data["pixels"][idx], data["xy"][idx], data["visible"][idx], recipe, generator)
        target = heatmap_targets(xy, visible, recipe["size"], recipe["heatmap"], recipe["sigma"])  # (B, K, H, H)
        heatmap_logits, logits = model(pixels.contiguous(memory_format=torch.channels_last))
        loss = heatmap_loss(heatmap_logits, target, recipe["positive_weight"])
        loss = loss + recipe["class_weight"] * F.cross_entropy(logits, data["labels"][idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    train_seconds = time.perf_counter() - start
    save(model.eval(), recipe, Path(out))
    figures = evaluate(WorldPoseDetector(out), recipe)
    log.info(
        "world pose detector: held-out PCK@0.2 %s clean, %s blurred (%d poses)",
        figures["clean"]["pck_0.2"],
        figures[f"blur_{recipe['eval_blur']}"]["pck_0.2"],
        figures["clean"]["n_poses"],
    )
    return {"seconds": round(train_seconds, 1), "loss": float(np.mean(losses[-50:])), "held_out": figures}


def save(model: PoseNet, recipe: dict, out: Path) -> None:
    """``out/config.json`` (architecture, keypoint layout, threshold, recipe) and ``out/model.safetensors``
    (fp16; batch norm's step counters are left out)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items() if v.is_floating_point()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "model": model.config,
        "classes": list(CLASSES),
        "size": recipe["size"],
        "heatmap": recipe["heatmap"],
        "threshold": recipe["threshold"],
        "skeletons": {kind: {"name": s.name, "keypoints": list(s.names)} for kind, s in SKELETONS.items()},
        "recipe": recipe,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def evaluate(detector: WorldPoseDetector, recipe: dict) -> dict:
    """The detector on ``eval_scenes`` renders of ``eval_seed``, clean and blurred by ``eval_blur`` pixels:
    detection rate, PCK@0.1 and @0.2 and mean OKS over robots and dogs (as ``metrics.pose_adherence``
    scores them: a miss or a pose of the other skeleton scores 0), class accuracy over all renders (vases
    and empty backgrounds are "nothing"), and the numbers of images behind them."""
    from posebooth.metrics import pose_scores, summarise_pose_scores
    from posebooth.world.scenes import scene_pose

    data = render_pose_scenes(recipe["eval_seed"], recipe["eval_scenes"], recipe["size"], recipe["empty"])
    images = [Image.fromarray(a) for a in data["pixels"].permute(0, 2, 3, 1).numpy()]
    labels = data["labels"].tolist()
    figures = {}
    for name, sigma in (("clean", 0.0), (f"blur_{recipe['eval_blur']}", recipe["eval_blur"])):
        rows, correct = [], 0
        for image, label, scene in zip(images, labels, data["scenes"], strict=True):
            shown = image.filter(ImageFilter.GaussianBlur(sigma)) if sigma else image
            heatmaps, probabilities = detector.predict(shown)
            correct += int(probabilities.argmax()) == label
            if CLASSES[label] in SKELETONS:
                found = detector.pose_from(heatmaps, probabilities, *image.size)
                target = scene_pose(scene, recipe["size"])
                if found is not None and found.skeleton != target.skeleton:
                    found = None  # the other class: nothing to compare
                rows.append(pose_scores(found, target.keypoints, target.skeleton.sigmas))
        scores = summarise_pose_scores(rows)
        figures[name] = {
            "pck_0.1": scores["pck_0.1"],
            "pck_0.2": scores["pck_0.2"],
            "detection_rate": scores["detection_rate"],
            "mean_oks": scores["mean_oks"],
            "n_poses": len(rows),
            "class_accuracy": round(correct / len(images), 6),
            "n_images": len(images),
        }
    return figures


class WorldPoseDetector:
    """posebooth's detector protocol for the world's subjects: a robot's OpenPose-18 pose, a dog's quadruped
    pose, or None (a vase, nothing), from the network saved in ``folder`` by ``train_pose_detector``."""

    name = "world"

    def __init__(self, folder: str | Path, device: str = "cpu"):
        """``folder`` holds ``config.json`` and ``model.safetensors``; the weights are loaded in fp32 on
        ``device``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for path in (folder, folder / CONFIG_FILE, folder / WEIGHTS_FILE):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path}: the world's pose detector is missing; it is made by `posebooth world pretrain` "
                    "(make world, part pose)"
                )
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG_FILE}: format {config.get('format')!r} is not {FORMAT!r}")
        for kind, skeleton in SKELETONS.items():
            saved = config["skeletons"][kind]
            if saved != {"name": skeleton.name, "keypoints": list(skeleton.names)}:
                raise ValueError(
                    f"{folder}: the detector was trained on another {kind} skeleton ({saved['name']}, "
                    f"{len(saved['keypoints'])} keypoints); retrain it with `posebooth world pretrain`"
                )
        self.device, self.size, self.threshold = device, config["size"], float(config["threshold"])
        self.model = PoseNet(**config["model"])
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # not saved, unused in eval
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_FILE}: missing weights {missing}, unexpected {unexpected}")
        self.model.to(device).eval().requires_grad_(False)

    def predict(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps (K, H, H) in [0, 1] and class probabilities (3,) of ``image`` (any size), resized to the
        network's input."""
        small = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 127.5 - 1  # [-1, 1]
        with torch.no_grad():
            heatmap_logits, logits = self.model(pixels[None].to(self.device))
        return heatmap_logits[0].float().sigmoid().cpu(), logits[0].float().softmax(dim=0).cpu()

    def pose_from(self, heatmaps: torch.Tensor, probabilities: torch.Tensor, width: int, height: int) -> Pose | None:
        """The pose that ``predict``'s output shows, on a ``width`` x ``height`` canvas: the skeleton of the
        likelier of robot and dog; None when fewer than a quarter of its keypoints' heatmap peaks reach the
        threshold, or when the class head says "nothing" and fewer than half do. (Generated figures often
        look to the class head like no subject while their joints are plain: the heatmaps decide.) Keypoints
        under the threshold are absent (confidence 0); the others have their peak, clipped to [1e-3, 1]."""
        kind = max(SKELETONS, key=lambda k: float(probabilities[CLASSES.index(k)]))
        kp = decode_heatmaps(heatmaps[CHANNELS[kind]], width, height)  # (K, 3): x, y, peak
        found = kp[:, 2] >= self.threshold
        nothing = CLASSES[int(probabilities.argmax())] not in SKELETONS
        if found.sum() < len(found) / (2 if nothing else 4):
            return None
        kp[:, 0], kp[:, 1] = kp[:, 0].clip(0, width), kp[:, 1].clip(0, height)
        kp[:, 2] = kp[:, 2].clip(1e-3, 1.0)
        return Pose(width, height, np.where(found[:, None], kp, 0.0), SKELETONS[kind])

    def detect(self, image: Image.Image, keypoints_path: Path | None = None) -> Pose | None:
        """The pose in ``image`` (any size) on its own canvas, or None (a vase, no subject, no keypoint
        found); ``keypoints_path`` is not used."""
        return self.pose_from(*self.predict(image), *image.size)
