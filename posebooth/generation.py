"""Batched, seeded image generation shared by ``generate_class_priors`` and ``sample``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image


def chunks(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def plan_batches(groups: list[list], size: int, cached: dict) -> tuple[list[list], list[list]]:
    """``(batches, todo)``: each group (items that can share a pipeline call) cut into batches of ``size``,
    and the batches to make. A batch is made again whole unless every item of it is in ``cached`` (item ->
    image or ``None``), so that a resumed run batches, and therefore generates, exactly like an
    uninterrupted one."""
    batches = [batch for group in groups for batch in chunks(group, size)]
    return batches, [batch for batch in batches if any(cached[item] is None for item in batch)]


@torch.no_grad()
def generate(
    pipe,
    prompt: str | list[str],
    seeds: list[int],
    *,
    steps: int,
    guidance_scale: float,
    resolution: int,
    negative_prompt: str = "",
    control_image: Image.Image | list[Image.Image] | None = None,
    conditioning_scale: float = 1.0,
    control_guidance: tuple[float, float] = (0.0, 1.0),
    width: int | None = None,
    height: int | None = None,
) -> list[Image.Image]:
    """One image per seed in a single batch: for ``prompt``, or for ``prompt[i]`` when it is a list (and for
    ``control_image[i]`` when that is a list); image i depends only on its prompt, pose and ``seeds[i]``.

    Each image gets its own ``torch.Generator``, so the noise does not depend on how images are batched.
    ``control_guidance`` is the (start, end) fraction of the denoising steps during which the ControlNet
    steers. ``width`` and ``height`` (pixels, multiples of 8) default to ``resolution``.
    """
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    prompts = prompt if isinstance(prompt, list) else [prompt] * len(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts for {len(seeds)} seeds")
    kwargs = dict(
        prompt=prompts,
        negative_prompt=[negative_prompt] * len(seeds) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height or resolution,
        width=width or resolution,
        generator=generators,
    )
    if control_image is not None:
        kwargs.update(image=control_image, controlnet_conditioning_scale=conditioning_scale,
                      control_guidance_start=control_guidance[0], control_guidance_end=control_guidance[1])  # fmt: skip
    return pipe(**kwargs).images
