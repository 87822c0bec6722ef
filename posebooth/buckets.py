"""Aspect-ratio buckets: training sizes of about one area in several aspects, and the photos grouped by them.

NovelAI's aspect-ratio bucketing, as kohya-ss/sd-scripts builds it (``library/model_util.make_bucket_resolutions``):
for each width a multiple of ``step``, the largest height (a multiple of ``step`` too) whose area stays within
``resolution²``. prepare_images crops each photo to the bucket nearest its aspect and resizes it to the bucket's
size; the training stages draw each batch from one bucket, so the images of a batch share one size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from posebooth.images import centre_crop_box

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(area: int, step: int, max_aspect: float) -> list[Size]:
    """Every bucket (width, height), sorted: multiples of ``step``, the largest height for each width with
    ``width * height <= area`` (kohya's rule, so that every bucket has close to the full area), and the
    longer side at most ``max_aspect`` times the shorter; and the largest square. The set is its own transpose."""
    if step < 1 or step * step > area:
        raise ValueError(f"prepare_images.bucket_step: {step} must be at least 1 and at most the resolution")
    if not max_aspect >= 1:
        raise ValueError(f"prepare_images.bucket_max_aspect: {max_aspect} must be >= 1 (longer side / shorter side)")
    side = math.isqrt(area) // step * step
    found = {(side, side)}  # the square, as kohya adds it (the area's when the resolution is a multiple of step)
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(w, h) / min(w, h) <= max_aspect:
            found |= {(w, h), (h, w)}
    return sorted(found)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect (width / height) is nearest to that of ``size`` in log space (a 2:1 and a 1:2
    photo are equally far from square); on a tie the squarer bucket."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), abs(math.log(b[0] / b[1]))))


def fit_pixels(pixels: torch.Tensor, size: Size) -> torch.Tensor:
    """Images (M, 3, H, W) centre-cropped to the aspect of ``size`` and resized to it: (M, 3, h, w) (the same
    tensor when already that size). For class images, generated square, in a bucket of photos."""
    height, width = pixels.shape[-2:]
    if (width, height) == tuple(size):
        return pixels
    left, top, right, bottom = centre_crop_box(width, height, size[0] / size[1])
    crop = pixels[..., top:bottom, left:right]
    return F.interpolate(crop, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)


@dataclass
class Bucket:
    """One bucket's training data, as a training stage caches it: its photos (all of one size), and the class
    images cropped and resized to that size. Fields a stage does not use stay None. Posteriors are
    ``models.Latents``, not imported here: prepare_images uses this module and should not depend on the models."""

    size: Size  # (width, height) in pixels
    index: torch.Tensor  # (n,) the photos' positions in the stage's list of photos
    latents: Any = None  # posteriors: stage 1 (n, K, 4, h, w) of its K views; stage 2 (n, 4, h, w)
    flipped: Any = None  # stage 1: the mirrored views' posteriors, or None without flips
    loss_maps: torch.Tensor | None = None  # stage 1: (n, K, 1, h, w), 1 outside face boxes
    time_ids: torch.Tensor | None = None  # SDXL: stage 1 (n, K, 2, 6) per view and mirror; stage 2 (n, 6)
    conds: torch.Tensor | None = None  # stage 2: pose maps (n, 3, H, W) in [0, 1]
    class_latents: Any = None  # posteriors (M, 4, h, w) of the class images fitted to ``size``
    class_time_ids: torch.Tensor | None = None  # SDXL: (M, 6) of the class images fitted to ``size``
    class_conds: torch.Tensor | None = None  # stage 2: the class images' pose maps fitted to ``size``

    def __len__(self) -> int:
        return len(self.index)


def group(sizes: list[Size]) -> list[Bucket]:
    """The photos grouped by size (``sizes[i]`` of photo i), buckets in order of their first photo."""
    order: dict[Size, list[int]] = {}
    for i, s in enumerate(sizes):
        order.setdefault(tuple(s), []).append(i)
    return [Bucket(size, torch.tensor(index, dtype=torch.long)) for size, index in order.items()]


def draw(buckets: list[Bucket], generator: torch.Generator) -> Bucket:
    """The bucket of the next batch, drawn with probability proportional to its number of photos (every
    photo as likely as with one bucket). One bucket: no draw, so the random stream is the one without
    buckets. The same on every process: all processes' generators are in step (``training.Shard``)."""
    if len(buckets) == 1:
        return buckets[0]
    counts = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    return buckets[int(torch.multinomial(counts, 1, generator=generator))]


def check_latent_fit(sizes: list[Size], downsampling: int, resolution: int) -> None:
    """Raise ``ValueError`` naming ``prepare_images.bucket_step`` when a bucket (other than the ``resolution``
    square, as without buckets) does not divide into whole latent cells of ``downsampling`` pixels (the VAE's:
    ``2 ** (len(vae.config.block_out_channels) - 1)``)."""
    for w, h in sizes:
        if (w, h) != (resolution, resolution) and (w % downsampling or h % downsampling):
            raise ValueError(
                f"prepare_images.bucket_step: the bucket {w}x{h} does not divide into this model's "
                f"{downsampling}-pixel latent cells; set bucket_step to a multiple of {downsampling} and re-run"
            )


def check_vae_fit(groups: list[Bucket], vae, resolution: int) -> None:
    """``check_latent_fit`` of the buckets ``groups`` against ``vae``'s downsampling (both training stages)."""
    check_latent_fit([g.size for g in groups], 2 ** (len(vae.config.block_out_channels) - 1), resolution)


def generated_time_ids(n: int, resolution: int, size: Size) -> torch.Tensor:
    """SDXL's time ids (n, 6) of ``n`` images generated at ``resolution`` square, centre-cropped to the aspect
    of ``size`` and resized to it (``fit_pixels``): original (R, R), the crop's top-left in the image resized
    so that the crop is ``size`` wide, target (h, w). For a square ``size`` of R: uncropped, at their own size."""
    left, top, right, _ = centre_crop_box(resolution, resolution, size[0] / size[1])
    scale = size[0] / (right - left)
    row = [resolution, resolution, round(top * scale), round(left * scale), size[1], size[0]]
    return torch.tensor([row] * n, dtype=torch.float32)
