"""A resumable cache of generated images, one PNG per seed (or name), outside the stage outputs.

DVC deletes a stage's outputs before it re-runs the stage, so ``generate_class_priors`` and ``sample`` also
keep what they generate in ``$POSEBOOTH_CACHE/<kind>/<key>/`` (``kind``: ``class_priors`` or ``samples``),
written atomically as soon as each batch is made. The key covers everything that determines an image (for
class priors: model, prompt, negative prompt, size, steps, guidance, scheduler, precision; the model by
``models.weights_fingerprint``, so changed weights under the same name are not mistaken for the old ones); an
interrupted or repeated run takes the valid images it finds there and generates only the rest.

Class priors are shared by every workspace (queued experiments included): the key addresses the content, each
image is written atomically and no run deletes them. The ``sample`` stage deletes its cache when it finishes,
so it keys it per workspace (``checkpoints.per_workspace``), like the training checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from posebooth import embedded


def cache_key(**fields) -> str:
    """A short hash of the fields that determine an image (besides its seed)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir(key: str, kind: str = "class_priors") -> Path:
    """``$POSEBOOTH_CACHE/<kind>/<key>/``."""
    return embedded.cache_root().parent / kind / key


def load_cached(folder: Path, seed: int | str, resolution: int) -> Image.Image | None:
    """The cached image for ``seed`` (or a name) if it exists, decodes and has the right size; else ``None``."""
    path = folder / f"{seed}.png"
    if not path.exists():
        return None
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError):
        return None  # truncated by an interruption: generate it again
    return image if image.size == (resolution, resolution) else None


def store(folder: Path, seed: int | str, image: Image.Image) -> None:
    """Write ``image`` for ``seed`` atomically (temporary file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{seed}.", suffix=".png", dir=folder)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, folder / f"{seed}.png")
    finally:
        Path(tmp).unlink(missing_ok=True)
