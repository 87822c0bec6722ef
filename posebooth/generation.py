"""Batched, seeded image generation shared by ``generate_class_priors`` and ``sample``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image


def chunks(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    seeds: list[int],
    *,
    steps: int,
    guidance_scale: float,
    resolution: int,
    negative_prompt: str = "",
    control_image: Image.Image | None = None,
    conditioning_scale: float = 1.0,
    control_guidance: tuple[float, float] = (0.0, 1.0),
) -> list[Image.Image]:
    """One image per seed for ``prompt`` in a single batch; image i depends only on ``seeds[i]``.

    Each image gets its own ``torch.Generator``, so the result does not depend on how seeds are batched.
    ``control_guidance`` is the (start, end) fraction of the denoising steps during which the ControlNet
    steers.
    """
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs = dict(
        prompt=[prompt] * len(seeds),
        negative_prompt=[negative_prompt] * len(seeds) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=resolution,
        width=resolution,
        generator=generators,
    )
    if control_image is not None:
        kwargs.update(image=control_image, controlnet_conditioning_scale=conditioning_scale,
                      control_guidance_start=control_guidance[0], control_guidance_end=control_guidance[1])  # fmt: skip
    return pipe(**kwargs).images
