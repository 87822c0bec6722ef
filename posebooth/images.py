"""Reading photos safely: EXIF orientation, RGB conversion, centre crop, resize, hashes.

Source files are only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"}
EXIF_ORIENTATION = 0x0112

log = logging.getLogger(__name__)


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


def list_others(folder: Path) -> list[tuple[Path, str]]:
    """What else ``folder`` holds, with why it is not used: sub-folders, and files that are neither images
    nor sidecars (keypoints ``.json`` or a caption ``.txt`` next to an image of the same name)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            out.append((p, "a sub-folder: only images directly in the folder are used"))
        elif p.suffix.lower() in (".json", ".txt"):
            if not any(p.with_suffix(s).exists() or p.with_suffix(s.upper()).exists() for s in IMAGE_SUFFIXES):
                what = "keypoint sidecars" if p.suffix.lower() == ".json" else "captions"
                out.append((p, f"a {p.suffix} file with no image of the same name ({what} sit next to their photo)"))
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            out.append((p, f"not an image ({p.suffix or 'no extension'}); images are {sorted(IMAGE_SUFFIXES)}"))
    return out


def read_caption(image_path: Path) -> str | None:
    """The caption of a photo: ``<stem>.txt`` beside it (kohya's convention), UTF-8 (a BOM is allowed),
    stripped; ``None`` without a file or for an empty one. Like kohya's sd-scripts, only the first (non-blank)
    line is the caption (further lines are kohya's wildcard alternatives, which are not used here)."""
    path = next((image_path.with_suffix(s) for s in (".txt", ".TXT") if image_path.with_suffix(s).is_file()), None)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: the caption is not UTF-8 text ({err}); save it as UTF-8") from err
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        log.warning("%s: %d lines; only the first is the caption (kohya's convention)", path, len(lines))
    return lines[0] if lines else None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _register_heif() -> None:
    """Let PIL open HEIC/HEIF (iPhone photos) through pillow-heif."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def load_image(path: Path, background: tuple[int, int, int] = (255, 255, 255)) -> LoadedImage:
    """Open ``path``, apply its EXIF orientation and convert to 8-bit RGB; ``ImageError`` if unusable.

    Transparent images (RGBA, LA, palette with transparency) are composited onto ``background``; 16-bit
    and 32-bit grey images are scaled to 8 bits rather than clipped; an animated image gives its first
    frame; an image over PIL's decompression-bomb limit is refused unopened.
    """
    import warnings

    if path.suffix.lower() in (".heic", ".heif"):
        _register_heif()
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: an empty file (0 bytes); remove or replace it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refuse
            with Image.open(path) as im:
                im.load()
                orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
                stored = im.size
                rgb = _to_rgb(ImageOps.exif_transpose(im), background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: too many pixels to open safely ({err}); downscale it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: cannot be read as an image ({err}); remove or replace it") from err
    return LoadedImage(rgb, orientation if orientation in range(1, 9) else 1, stored)


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16/32-bit grey: scale, do not clip
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        top = max(top if im.mode != "F" else a.max(), 1e-12)
        im = Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def near_hash(image: Image.Image, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A difference hash (dHash: 256 bits from a 17 x 16 grey thumbnail) and an 8 x 8 colour thumbnail.
    Near duplicates (re-encoded or resized copies) differ in few bits and little colour; the colour
    keeps flat images, whose hashes are all alike, apart."""
    grey = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    thumb = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    return (grey[:, 1:] > grey[:, :-1]).flatten(), thumb


def is_near_duplicate(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], bits: int = 12) -> bool:
    """Whether two ``near_hash`` values are the same picture: at most ``bits`` of 256 differ and the colour
    thumbnails differ by under 12 levels on average."""
    return int((a[0] != b[0]).sum()) <= bits and float(np.abs(a[1] - b[1]).mean()) < 12.0


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


def box_size(width: int, height: int, aspect: float = 1.0, outside: bool = False) -> tuple[int, int]:
    """(width, height) of the largest box of ``aspect`` (width / height) inside a ``width`` x ``height`` image,
    or with ``outside`` the smallest one holding it; aspect 1: the shorter (longer) side squared."""
    if (width >= height * aspect) != outside:
        return round(height * aspect), height
    return width, round(width / aspect)


def centre_crop_box(width: int, height: int, aspect: float = 1.0) -> tuple[int, int, int, int]:
    """The largest centred box (left, top, right, bottom) of ``aspect`` (width / height): a square by default."""
    crop_w, crop_h = box_size(width, height, aspect)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def pad_box(width: int, height: int, aspect: float = 1.0) -> tuple[int, int, int, int]:
    """The centred box of ``aspect`` (a square by default) that holds the whole image (it reaches outside the
    image: padding)."""
    box_w, box_h = box_size(width, height, aspect, outside=True)
    left, top = -((box_w - width) // 2), -((box_h - height) // 2)
    return left, top, left + box_w, top + box_h


def crop_resize(
    image: Image.Image,
    box: tuple[int, int, int, int],
    size: int | tuple[int, int],
    fill: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Crop ``box`` (which may reach outside the image; that part is ``fill``) and resize to ``size`` (an int:
    a square; or (width, height)) with Lanczos."""
    left, top, right, bottom = box
    canvas = Image.new("RGB", (right - left, bottom - top), tuple(fill))
    canvas.paste(image, (-left, -top))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return canvas.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


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
