"""Face boxes from OpenCV's shipped Haar cascade: offline, no weights to fetch.

Used for face-aware cropping in ``prepare_images``. ``opencv-python-headless`` must stay below 5:
5.0 ships neither the cascades nor ``CascadeClassifier``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from posebooth.images import box_size

CASCADE = "haarcascade_frontalface_default.xml"


@lru_cache(maxsize=1)
def _cascade():
    import cv2

    path = cv2.data.haarcascades + CASCADE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise OSError(f"OpenCV's face cascade {path} could not be loaded; reinstall opencv-python-headless<5")
    return cascade


def detect_faces(image: Image.Image, min_size: int = 24, max_side: int = 400) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` in pixels of ``image``, largest first.

    The cascade runs on a copy at most ``max_side`` pixels wide or high (a 2048 px photo takes a second at
    full size and finds the same faces), and boxes are scaled back.
    """
    scale = min(1.0, max_side / max(image.size))
    small = image.convert("L")
    if scale < 1.0:
        small = small.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    found = _cascade().detectMultiScale(
        np.asarray(small), scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size)
    )
    boxes = [tuple(int(round(v / scale)) for v in f) for f in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: (-b[2] * b[3], b[0], b[1]))


def face_crop_box(
    size: tuple[int, int], face: tuple[int, int, int, int], aspect: float = 1.0
) -> tuple[int, int, int, int]:
    """The largest box of ``aspect`` (width / height; a square by default) inside the image, as centred on
    the face as the borders allow."""
    w, h = size
    crop_w, crop_h = box_size(w, h, aspect)
    cx, cy = face[0] + face[2] / 2, face[1] + face[3] / 2
    left = int(round(min(max(cx - crop_w / 2, 0), w - crop_w)))
    top = int(round(min(max(cy - crop_h / 2, 0), h - crop_h)))
    return left, top, left + crop_w, top + crop_h
