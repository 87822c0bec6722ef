"""Loading upstream stage outputs as tensors: prepared instance images, class images, pose pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from posebooth.images import to_tensor
from posebooth.outputs import read_json


def _read_rgb(path: Path, resolution: int) -> Image.Image:
    with Image.open(path) as im:
        image = im.convert("RGB")
    if image.size != (resolution, resolution):
        raise ValueError(
            f"{path}: is {image.size[0]}x{image.size[1]}, expected {resolution}x{resolution}; re-run dvc repro"
        )
    return image


def instance_images(prepared: str | Path, resolution: int) -> tuple[list[str], torch.Tensor]:
    """Names and pixels (N, 3, R, R) in [-1, 1] of the prepared instance images."""
    prepared = Path(prepared)
    names = [r["name"] for r in read_json(prepared / "manifest.json")["images"]]
    if not names:
        raise ValueError(f"{prepared}: no prepared images; check the prepare_images stage")
    return names, torch.stack([to_tensor(_read_rgb(prepared / "images" / f"{n}.png", resolution)) for n in names])


def instance_captions(prepared: str | Path, names: list[str]) -> list[str | None]:
    """The caption prepare_images recorded for each prepared image ``names`` (from ``<stem>.txt`` beside the
    photo), or None; a manifest written before captions existed has none."""
    records = {r["name"]: r for r in read_json(Path(prepared) / "manifest.json")["images"]}
    return [records[name].get("caption") for name in names]


def time_ids(prepared: str | Path, names: list[str], resolution: int) -> torch.Tensor:
    """SDXL's time ids (N, 6) of the prepared images ``names`` as they are: (original height, width, crop top,
    left, target height, width), from what prepare_images recorded of each photo."""
    return view_time_ids(prepared, names, resolution, [[(0, 0, resolution)]] * len(names))[:, 0, 0]


def view_time_ids(
    prepared: str | Path, names: list[str], resolution: int, windows: list[list[tuple[int, int, int]]]
) -> torch.Tensor:
    """SDXL's time ids (N, K, 2, 6) of each training view of each prepared image, as it is and mirrored.

    A view is a window (x, y, side) of the prepared square, resized to ``resolution``: in the photo resized
    to match, the crop's top-left moves by the window's offset and everything scales by resolution / side.
    A mirrored view's crop is measured in the mirrored photo, as SDXL's training scripts flip before they
    crop: left = (resized photo width) - left - resolution.
    """
    records = {r["name"]: r for r in read_json(Path(prepared) / "manifest.json")["images"]}
    out = torch.zeros(len(names), len(windows[0]), 2, 6)
    for i, name in enumerate(names):
        record = records[name]
        if "original_size" not in record:
            raise ValueError(f"{prepared}/manifest.json: {name} has no original_size; re-run prepare_images")
        (height, width), (top, left) = record["original_size"], record["crop_top_left"]
        box = record["crop_box"]
        photo_width = width * resolution / (box[2] - box[0])  # the photo resized so that the crop is R wide
        for k, (x, y, side) in enumerate(windows[i]):
            zoom = resolution / side
            view_top, view_left = (top + y) * zoom, (left + x) * zoom
            mirrored_left = max(0.0, photo_width * zoom - view_left - resolution)
            for f, crop_left in enumerate((view_left, mirrored_left)):
                out[i, k, f] = torch.tensor([height, width, round(view_top), round(crop_left), resolution, resolution])
    return out


def generated_time_ids(n: int, resolution: int) -> torch.Tensor:
    """SDXL's time ids (N, 6) of ``n`` images generated at ``resolution``: uncropped, at their own size."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=torch.float32)


def class_images(class_dir: str | Path, resolution: int) -> torch.Tensor:
    """Pixels (M, 3, R, R) in [-1, 1] of the generated class images; M may be 0."""
    class_dir = Path(class_dir)
    files = [class_dir / r["file"] for r in read_json(class_dir / "manifest.json")["images"]]
    if not files:
        return torch.empty(0, 3, resolution, resolution)
    return torch.stack([to_tensor(_read_rgb(f, resolution)) for f in files])


def pose_map_tensor(image: Image.Image) -> torch.Tensor:
    """A pose map (RGB, black background) -> ``controlnet_cond`` (3, H, W) in [0, 1], not normalised."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def pose_pairs(
    poses: str | Path, image_dirs: dict[str, str | Path], resolution: int, kind: str
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Images with a usable pose of ``kind`` ("instance" or "class"), from ``image_dirs[kind]/images``.

    Returns (names, images (N, 3, R, R) in [-1, 1], pose maps (N, 3, R, R) in [0, 1]); N may be 0.
    """
    poses = Path(poses)
    names = [r["name"] for r in read_json(poses / "report.json")["images"] if r["used"] and r["kind"] == kind]
    if not names:
        empty = torch.empty(0, 3, resolution, resolution)
        return [], empty, empty.clone()
    folder = Path(image_dirs[kind]) / "images"
    images = torch.stack([to_tensor(_read_rgb(folder / f"{n}.png", resolution)) for n in names])
    maps = torch.stack([pose_map_tensor(_read_rgb(poses / "maps" / f"{n}.png", resolution)) for n in names])
    return names, images, maps
