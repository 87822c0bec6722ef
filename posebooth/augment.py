"""Training views of the instance photos: random zoomed crops and mirror images, with face-box masks.

Views are made once, before training, from a generator seeded by ``common.seed`` (deterministic), so their
latents can be encoded once and cached; each step then picks a view per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels


def crop_views(
    pixels: torch.Tensor, boxes: list[Box | None], n: int, min_scale: float, generator: torch.Generator
) -> tuple[torch.Tensor, list[list[Box | None]], list[list[tuple[int, int, int]]]]:
    """Each image as is plus ``n`` random crops of its aspect (sides a uniform fraction in [min_scale, 1] of
    the image's, anywhere inside it) resized back to full size.

    ``pixels`` (N, 3, H, W) -> views (N, n + 1, 3, H, W), view 0 the image itself; ``boxes`` (a face box or
    None per image) follow their image into each view, clipped to the crop (None when outside it); and each
    view's window (x, y, width, height) in its image (view 0: (0, 0, W, H)), from which SDXL's crop conditioning follows.
    """
    height, width = pixels.shape[-2:]
    views, view_boxes = [pixels], [[b] for b in boxes]
    windows = [[(0, 0, width, height)] for _ in boxes]
    for _ in range(n):
        fraction = min_scale + (1 - min_scale) * torch.rand(len(pixels), generator=generator)  # (N,)
        side_w, side_h = (fraction * width).round().clamp(min=1), (fraction * height).round().clamp(min=1)
        x0 = ((width - side_w) * torch.rand(len(pixels), generator=generator)).floor()
        y0 = ((height - side_h) * torch.rand(len(pixels), generator=generator)).floor()
        crops = []
        for i, image in enumerate(pixels):
            sw, sh, x, y = int(side_w[i]), int(side_h[i]), int(x0[i]), int(y0[i])
            crop = image[:, y : y + sh, x : x + sw].unsqueeze(0)
            crops.append(
                F.interpolate(crop, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
            )
            view_boxes[i].append(_crop_box(boxes[i], x, y, sw, sh, width / sw, height / sh))
            windows[i].append((x, y, sw, sh))
        views.append(torch.stack(crops))
    return torch.stack(views, dim=1), view_boxes, windows


def _crop_box(box: Box | None, x: int, y: int, w: int, h: int, scale_x: float, scale_y: float) -> Box | None:
    if box is None:
        return None
    x0, y0 = max(box[0] - x, 0), max(box[1] - y, 0)
    x1, y1 = min(box[2] - x, w), min(box[3] - y, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)


def box_mask(box: Box | None, image_size: int | tuple[int, int], latent_size: int | tuple[int, int]) -> torch.Tensor:
    """(1, h, w) mask in latent space: the fraction of each latent cell that the pixel box covers. Sizes are
    ints (squares) or (width, height)."""
    image_w, _ = (image_size, image_size) if isinstance(image_size, int) else image_size
    latent_w, latent_h = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    mask = torch.zeros(1, latent_h, latent_w)
    if box is None:
        return mask
    cell = image_w / latent_w  # the VAE's downsampling, the same across and down

    def cover(n: int, lo_edge: float, hi_edge: float) -> torch.Tensor:
        edges = torch.arange(n + 1) * cell
        lo, hi = edges[:-1], edges[1:]
        return ((torch.minimum(hi, torch.tensor(hi_edge)) - torch.maximum(lo, torch.tensor(lo_edge))) / cell).clamp(
            0, 1
        )

    mask[0] = cover(latent_h, box[1], box[3])[:, None] * cover(latent_w, box[0], box[2])[None, :]
    return mask


def face_boxes(pixels: torch.Tensor) -> list[Box | None]:
    """The largest face box of each image (N, 3, H, W) in [-1, 1], from OpenCV's Haar cascade, or None."""
    from PIL import Image

    from posebooth.faces import detect_faces

    out = []
    for image in pixels:
        array = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        found = detect_faces(Image.fromarray(array), min_size=max(8, pixels.shape[-1] // 16))
        out.append(
            None if not found else (found[0][0], found[0][1], found[0][0] + found[0][2], found[0][1] + found[0][3])
        )
    return out
