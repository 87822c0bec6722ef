"""Loading upstream stage outputs as tensors: prepared instance images, class images, pose pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from posebooth import buckets
from posebooth.images import to_tensor
from posebooth.outputs import read_json


def _read_rgb(path: Path, size: int | tuple[int, int]) -> Image.Image:
    """The RGB image at ``path``, which must be ``size`` (an int: a square; or (width, height)) big."""
    width, height = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        image = im.convert("RGB")
    if image.size != (width, height):
        raise ValueError(f"{path}: is {image.size[0]}x{image.size[1]}, expected {width}x{height}; re-run dvc repro")
    return image


def instance_sizes(prepared: str | Path, resolution: int) -> tuple[list[str], list[tuple[int, int]]]:
    """Names and sizes (width, height) of the prepared instance images: the bucket each was prepared for
    (``resolution`` square in a manifest from before buckets)."""
    prepared = Path(prepared)
    records = read_json(prepared / "manifest.json")["images"]
    if not records:
        raise ValueError(f"{prepared}: no prepared images; check the prepare_images stage")
    return [r["name"] for r in records], [tuple(r.get("bucket", (resolution, resolution))) for r in records]


def instance_images(prepared: str | Path, resolution: int) -> tuple[list[str], torch.Tensor]:
    """Names and pixels (N, 3, R, R) in [-1, 1] of the prepared instance images; images prepared in
    aspect-ratio buckets are centre-cropped and resized to R x R (as references for the metrics)."""
    names, sizes = instance_sizes(prepared, resolution)
    pixels = [
        to_tensor(_read_rgb(Path(prepared) / "images" / f"{n}.png", s)) for n, s in zip(names, sizes, strict=True)
    ]
    return names, torch.stack([buckets.fit_pixels(p[None], (resolution, resolution))[0] for p in pixels])


def instance_buckets(prepared: str | Path, resolution: int) -> tuple[list[str], list[buckets.Bucket], list]:
    """Names of the prepared instance images, the images grouped by bucket (``buckets.group``: one group
    without buckets, all photos in order) and each group's pixels (n, 3, h, w) in [-1, 1]."""
    names, sizes = instance_sizes(prepared, resolution)
    groups = buckets.group(sizes)
    pixels = [
        torch.stack([to_tensor(_read_rgb(Path(prepared) / "images" / f"{names[i]}.png", g.size)) for i in g.index])
        for g in groups
    ]
    return names, groups, pixels


def instance_captions(prepared: str | Path, names: list[str]) -> list[str | None]:
    """The caption prepare_images recorded for each prepared image ``names`` (from ``<stem>.txt`` beside the
    photo), or None; a manifest written before captions existed has none."""
    records = {r["name"]: r for r in read_json(Path(prepared) / "manifest.json")["images"]}
    return [records[name].get("caption") for name in names]


def time_ids(prepared: str | Path, names: list[str], resolution: int) -> torch.Tensor:
    """SDXL's time ids (N, 6) of the prepared images ``names`` as they are: (original height, width, crop top,
    left, target height, width), from what prepare_images recorded of each photo."""
    records = {r["name"]: r for r in read_json(Path(prepared) / "manifest.json")["images"]}
    sizes = [records[n].get("bucket", (resolution, resolution)) for n in names]
    return view_time_ids(prepared, names, resolution, [[(0, 0, w, h)] for w, h in sizes])[:, 0, 0]


def view_time_ids(
    prepared: str | Path, names: list[str], resolution: int, windows: list[list[tuple[int, int, int, int]]]
) -> torch.Tensor:
    """SDXL's time ids (N, K, 2, 6) of each training view of each prepared image, as it is and mirrored.

    A view is a window (x, y, width, height) of the prepared image (``resolution`` square, or its bucket's size
    (w, h)), about of the image's aspect (each side rounded on its own), resized to the image's size: in the
    photo resized to match, the crop's top-left moves by the window's offset, then scales by h / height down
    and w / width across. A mirrored view's crop is
    measured in the mirrored photo, as SDXL's training scripts flip before they crop: left = (resized photo
    width) - left - w. The target size is the image's (h, w).
    """
    records = {r["name"]: r for r in read_json(Path(prepared) / "manifest.json")["images"]}
    out = torch.zeros(len(names), len(windows[0]), 2, 6)
    for i, name in enumerate(names):
        record = records[name]
        if "original_size" not in record:
            raise ValueError(f"{prepared}/manifest.json: {name} has no original_size; re-run prepare_images")
        (height, width), (top, left) = record["original_size"], record["crop_top_left"]
        box = record["crop_box"]
        target_w, target_h = record.get("bucket", (resolution, resolution))
        photo_width = width * target_w / (box[2] - box[0])  # the photo resized so that the crop is w wide
        for k, (x, y, side_w, side_h) in enumerate(windows[i]):
            zoom_x, zoom_y = target_w / side_w, target_h / side_h
            view_top, view_left = (top + y) * zoom_y, (left + x) * zoom_x
            mirrored_left = max(0.0, photo_width * zoom_x - view_left - target_w)
            for f, crop_left in enumerate((view_left, mirrored_left)):
                out[i, k, f] = torch.tensor([height, width, round(view_top), round(crop_left), target_h, target_w])
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


def pose_pair_buckets(
    poses: str | Path, prepared: str | Path, resolution: int
) -> tuple[list[str], list[buckets.Bucket], list[torch.Tensor]]:
    """The instance images with a usable pose, grouped by bucket (``buckets.group``: one group without buckets),
    with each group's pose maps in ``conds``. Returns (names, groups, pixels (n, 3, h, w) in [-1, 1] per group);
    a group's ``conds`` are (n, 3, h, w) in [0, 1]."""
    poses, prepared = Path(poses), Path(prepared)
    names = [r["name"] for r in read_json(poses / "report.json")["images"] if r["used"] and r["kind"] == "instance"]
    records = {r["name"]: r for r in read_json(prepared / "manifest.json")["images"]}
    groups = buckets.group([tuple(records[n].get("bucket", (resolution, resolution))) for n in names])
    pixels = []
    for g in groups:
        pixels.append(
            torch.stack([to_tensor(_read_rgb(prepared / "images" / f"{names[i]}.png", g.size)) for i in g.index])
        )
        g.conds = torch.stack([pose_map_tensor(_read_rgb(poses / "maps" / f"{names[i]}.png", g.size)) for i in g.index])
    return names, groups, pixels
