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
    """Each image as is plus ``n`` random square crops (side a uniform fraction in [min_scale, 1] of the
    image's, anywhere inside it) resized back to full size.

    ``pixels`` (N, 3, R, R) -> views (N, n + 1, 3, R, R), view 0 the image itself; ``boxes`` (a face box or
    None per image) follow their image into each view, clipped to the crop (None when outside it); and each
    view's window (x, y, side) in its image (view 0: (0, 0, R)), from which SDXL's crop conditioning follows.
    """
    size = pixels.shape[-1]
    views, view_boxes = [pixels], [[b] for b in boxes]
    windows = [[(0, 0, size)] for _ in boxes]
    for _ in range(n):
        side = (min_scale + (1 - min_scale) * torch.rand(len(pixels), generator=generator)) * size  # (N,)
        side = side.round().clamp(min=1)
        x0 = ((size - side) * torch.rand(len(pixels), generator=generator)).floor()
        y0 = ((size - side) * torch.rand(len(pixels), generator=generator)).floor()
        crops = []
        for i, image in enumerate(pixels):
            s, x, y = int(side[i]), int(x0[i]), int(y0[i])
            crop = image[:, y : y + s, x : x + s].unsqueeze(0)
            crops.append(
                F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            )
            view_boxes[i].append(_crop_box(boxes[i], x, y, s, size / s))
            windows[i].append((x, y, s))
        views.append(torch.stack(crops))
    return torch.stack(views, dim=1), view_boxes, windows


def _crop_box(box: Box | None, x: int, y: int, side: int, scale: float) -> Box | None:
    if box is None:
        return None
    x0, y0 = max(box[0] - x, 0), max(box[1] - y, 0)
    x1, y1 = min(box[2] - x, side), min(box[3] - y, side)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0 * scale, y0 * scale, x1 * scale, y1 * scale)


def box_mask(box: Box | None, image_size: int, latent_size: int) -> torch.Tensor:
    """(1, h, w) mask in latent space: the fraction of each latent cell that the pixel box covers."""
    mask = torch.zeros(1, latent_size, latent_size)
    if box is None:
        return mask
    cell = image_size / latent_size
    edges = torch.arange(latent_size + 1) * cell
    lo, hi = edges[:-1], edges[1:]
    cover_x = ((torch.minimum(hi, torch.tensor(box[2])) - torch.maximum(lo, torch.tensor(box[0]))) / cell).clamp(0, 1)
    cover_y = ((torch.minimum(hi, torch.tensor(box[3])) - torch.maximum(lo, torch.tensor(box[1]))) / cell).clamp(0, 1)
    mask[0] = cover_y[:, None] * cover_x[None, :]
    return mask


def face_boxes(pixels: torch.Tensor) -> list[Box | None]:
    """The largest face box of each image (N, 3, R, R) in [-1, 1], from OpenCV's Haar cascade, or None."""
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
