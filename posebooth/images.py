"""Reading photos safely: EXIF orientation, RGB conversion, centre crop, resize, hashes.

Source files are only ever opened for reading.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".heic", ".heif"}
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class LoadedImage:
    """An image as displayed (EXIF orientation applied), in RGB, with what it took to get there."""

    image: Image.Image
    orientation: int  # EXIF orientation tag of the file as stored (1 = none)
    stored_size: tuple[int, int]  # (width, height) of the pixels as stored in the file


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; other files are not images."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _register_heif() -> None:
    """Let PIL open HEIC/HEIF (iPhone photos) through pillow-heif."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def load_image(path: Path) -> LoadedImage:
    """Open ``path``, apply its EXIF orientation and convert to RGB; ``ImageError`` if unreadable."""
    if path.suffix.lower() in (".heic", ".heif"):
        _register_heif()
    try:
        with Image.open(path) as im:
            im.load()
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            stored = im.size
            shown = ImageOps.exif_transpose(im)
            rgb = shown.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: cannot be read as an image ({err}); remove or replace it") from err
    return LoadedImage(rgb, orientation if orientation in range(1, 9) else 1, stored)


def orient_points(xy: np.ndarray, orientation: int, size: tuple[int, int]) -> np.ndarray:
    """Map points (N, 2) in stored-pixel coordinates to the displayed image, as ``exif_transpose`` maps pixels.

    ``size`` is the stored (width, height). Coordinates are continuous (pixel centres at +0.5).
    """
    w, h = size
    x, y = xy[:, 0], xy[:, 1]
    mapping = {
        1: (x, y),
        2: (w - x, y),  # mirrored horizontally
        3: (w - x, h - y),  # rotated 180
        4: (x, h - y),  # mirrored vertically
        5: (y, x),  # transposed
        6: (h - y, x),  # rotated 90 clockwise to display
        7: (h - y, w - x),  # transversed
        8: (y, w - x),  # rotated 90 counter-clockwise to display
    }
    nx, ny = mapping[orientation]
    return np.stack([nx, ny], axis=1)


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square (left, top, right, bottom)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def pad_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square that holds the whole image (it reaches outside the image: padding)."""
    side = max(width, height)
    left, top = -((side - width) // 2), -((side - height) // 2)
    return left, top, left + side, top + side


def crop_resize(
    image: Image.Image, box: tuple[int, int, int, int], size: int, fill: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Crop ``box`` (which may reach outside the image; that part is ``fill``) and resize to ``size`` (Lanczos)."""
    left, top, right, bottom = box
    canvas = Image.new("RGB", (right - left, bottom - top), tuple(fill))
    canvas.paste(image, (-left, -top))
    return canvas.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


def pixel_hash(image: Image.Image) -> str:
    """Hash of the decoded pixels: the same picture saved twice (or re-encoded losslessly) collides."""
    return hashlib.sha256(image.tobytes()).hexdigest()


def to_tensor(image: Image.Image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(images) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
