"""Turning a folder of photos into training images: orient, crop, resize, carry keypoints along."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from posebooth import outputs
from posebooth.buckets import nearest_bucket
from posebooth.faces import detect_faces, face_crop_box
from posebooth.images import (
    ImageError,
    centre_crop_box,
    crop_resize,
    file_sha256,
    is_near_duplicate,
    list_images,
    list_others,
    load_image,
    near_hash,
    orient_points,
    pad_box,
    pixel_hash,
    read_caption,
)
from posebooth.poses import Pose, crop_scale_pose, load_pose, map_pose

NEAR_DUPLICATE_BITS = 12  # of the 256-bit difference hash: re-encodes and resizes differ by a few bits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """One usable photo, ready for training."""

    name: str  # output stem, unique in the set
    source: Path
    image: Image.Image  # RGB, resolution x resolution, or its aspect-ratio bucket's size
    pose: Pose | None  # keypoints in the prepared image's pixels, if a sidecar exists
    record: dict  # manifest entry


@dataclass(frozen=True)
class Skipped:
    source: Path
    reason: str


def _safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "image"


def size_conditioning(size: tuple[int, int], box: tuple[int, int, int, int], resolution: int) -> dict:
    """What SDXL is conditioned on besides the prompt (its ``add_time_ids``), the way its training scripts
    record it: the photo's ``original_size`` (height, width) and ``crop_top_left`` (top, left) of the crop in
    the photo resized so that the crop is ``resolution`` wide (the square's side, or its bucket's width; 0
    where the box reaches outside: padding)."""
    scale = resolution / (box[2] - box[0])
    return {"original_size": [size[1], size[0]],
            "crop_top_left": [max(0, round(box[1] * scale)), max(0, round(box[0] * scale))]}  # fmt: skip


def choose_box(
    image: Image.Image, crop: str, aspect: float = 1.0
) -> tuple[tuple[int, int, int, int], str, list | None]:
    """The box of ``aspect`` (width / height: a square, or the photo's bucket) to cut from ``image``:
    ``(box, how, face)``; ``how`` says what happened, for the manifest."""
    w, h = image.size
    if crop == "pad":
        return pad_box(w, h, aspect), "pad", None
    if crop == "face":
        faces = detect_faces(image)
        if faces:
            how = "face" if len(faces) == 1 else f"face (largest of {len(faces)})"
            return face_crop_box((w, h), faces[0], aspect), how, list(faces[0])
        return centre_crop_box(w, h, aspect), "centre (no face found)", None
    if crop == "centre":
        return centre_crop_box(w, h, aspect), "centre", None
    raise ValueError(f"prepare_images.crop: unknown crop {crop!r}; choose centre, face or pad")


def prepare_folder(
    input_dir: str | Path,
    resolution: int,
    min_source_size: int,
    crop: str = "centre",
    pad_color: tuple[int, int, int] = (0, 0, 0),
    buckets: list[tuple[int, int]] | None = None,
) -> tuple[list[Prepared], list[Skipped]]:
    """Prepare every image in ``input_dir``, with its caption (``<stem>.txt``) and keypoints (``<stem>.json``)
    if it has them; unusable ones are skipped with a reason naming the problem. Each becomes a
    ``resolution`` square, or with ``buckets`` (width, height) (``posebooth.buckets.bucket_sizes``) the size
    of the bucket nearest its aspect."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"prepare_images.input_dir: {folder} is not a folder; put the subject's photos there")
    kept: list[Prepared] = []
    skipped: list[Skipped] = [Skipped(p, why) for p, why in list_others(folder)]
    seen: dict[str, Path] = {}
    near: list[tuple[tuple, Path]] = []
    for i, path in enumerate(list_images(folder)):
        try:
            loaded = load_image(path, tuple(pad_color))
        except ImageError as err:
            skipped.append(Skipped(path, str(err).removeprefix(f"{path}: ")))
            continue
        w, h = loaded.image.size
        if min(w, h) < min_source_size:
            skipped.append(
                Skipped(
                    path, f"too small: {w}x{h}, shorter side below prepare_images.min_source_size={min_source_size}"
                )
            )
            continue
        digest = pixel_hash(loaded.image)
        if digest in seen:
            skipped.append(Skipped(path, f"duplicate of {seen[digest].name}"))
            continue
        seen[digest] = path
        bits = near_hash(loaded.image)
        twin = next((p for h, p in near if is_near_duplicate(h, bits, NEAR_DUPLICATE_BITS)), None)
        if twin is not None:
            skipped.append(Skipped(path, f"near duplicate of {twin.name} (the same picture resized or re-encoded)"))
            continue
        near.append((bits, path))
        bucket = nearest_bucket((w, h), buckets) if buckets else (resolution, resolution)
        box, how, face = choose_box(loaded.image, crop, bucket[0] / bucket[1])
        if how.startswith("centre (no face"):
            log.warning("%s: no face found, centre crop instead", path)
        pose = None
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            stored = load_pose(sidecar)  # PoseError names the file
            if (stored.width, stored.height) != loaded.stored_size:
                raise ValueError(
                    f"{sidecar}: keypoints are for a {stored.width}x{stored.height} image but {path.name} stores "
                    f"{loaded.stored_size[0]}x{loaded.stored_size[1]} pixels; annotate the image as stored"
                )
            shown = map_pose(
                stored, partial(orient_points, orientation=loaded.orientation, size=loaded.stored_size), w, h
            )
            pose = crop_scale_pose(shown, box, bucket)
        name = f"{i:03d}_{_safe_stem(path.stem)}"
        record = {
            "name": name,
            "source": str(path),
            "sha256": file_sha256(path),
            "source_size": list(loaded.stored_size),
            "exif_orientation": loaded.orientation,
            "oriented_size": [w, h],
            "crop": how,
            "crop_box": list(box),
            **size_conditioning((w, h), box, bucket[0]),
            "face_box": face,
            "resolution": resolution,
            "bucket": list(bucket),  # (width, height) of the prepared image: its aspect-ratio bucket, or the square
            "keypoints": pose is not None,
            "caption": read_caption(path),  # <stem>.txt beside the photo (kohya's convention), or None
        }
        kept.append(Prepared(name, path, crop_resize(loaded.image, box, bucket, tuple(pad_color)), pose, record))
    return kept, skipped


def write_prepared(out: Path, kept: list[Prepared], skipped: list[Skipped]) -> None:
    """Write images/*.png, keypoints/*.json and manifest.json into ``out``."""
    (out / "images").mkdir(parents=True)
    (out / "keypoints").mkdir()
    for item in kept:
        item.image.save(out / "images" / f"{item.name}.png")
        if item.pose is not None:
            outputs.write_json(out / "keypoints" / f"{item.name}.json", item.pose.to_json())
    outputs.write_json(
        out / "manifest.json",
        {
            "images": [k.record for k in kept],
            "skipped": [{"source": str(s.source), "reason": s.reason} for s in skipped],
        },
    )
