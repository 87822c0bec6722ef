"""Face-identity similarity for people: does the generated face belong to the person in the photos?

The largest face of each image (OpenCV's shipped Haar cascade, ``faces.py``) is cropped with a margin,
resized to 160 px and embedded; the score is the mean cosine between each generated face and each
reference face, with a bootstrap interval over the generated images, the share of generated images where
a face was found, and how many reference photos had one.

The embedder is FaceNet (InceptionResnetV1 trained on VGGFace2) from the ``facenet-pytorch`` package,
whose weights come from its GitHub release and are read here with ``weights_only=True``. The package is
optional (its metadata pins an old torch: install it with ``pip install --no-deps facenet-pytorch``);
without it, or without its weights, the metric says "not measured" and why, and the stage goes on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from posebooth import hub, stats
from posebooth.faces import detect_faces

FACENET_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
PERSON_NOUNS = {"person", "man", "woman", "boy", "girl", "child", "kid", "baby", "people", "guy", "lady", "face"}


def is_person(class_noun: str) -> bool:
    return class_noun.strip().lower() in PERSON_NOUNS


def face_crop(image: Image.Image, size: int = 160, margin: float = 0.2) -> Image.Image | None:
    """The largest face with ``margin`` of its size around it, ``size`` x ``size``; None without a face."""
    found = detect_faces(image, min_size=max(16, min(image.size) // 16))
    if not found:
        return None
    x, y, w, h = found[0]
    m = margin * max(w, h)
    box = (max(0, x - m), max(0, y - m), min(image.width, x + w + m), min(image.height, y + h + m))
    return image.convert("RGB").crop(tuple(int(v) for v in box)).resize((size, size), Image.Resampling.BICUBIC)


class FacenetEmbedder:
    """FaceNet embeddings (512-d) of 160 px face crops."""

    def __init__(self, weights: str = "", device: str = "cpu"):
        try:
            from facenet_pytorch import InceptionResnetV1
        except ImportError as err:
            raise OSError("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch)") from err
        self.model = InceptionResnetV1(pretrained=None, classify=False).eval().to(device)
        self.model.load_state_dict(_facenet_state(weights), strict=False)
        self.device = device

    @torch.no_grad()
    def __call__(self, crops: list[Image.Image]) -> torch.Tensor:
        import numpy as np

        x = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32)).permute(2, 0, 1) for c in crops])
        return self.model(((x - 127.5) / 128.0).to(self.device))  # facenet's fixed image standardisation


def _facenet_state(weights: str) -> dict:
    path = hub.release_file(weights, FACENET_URL, "evaluate.face_weights", "FaceNet weights")
    state = hub.load_weights(path)
    return {k: v for k, v in state.items() if not k.startswith("logits.")}  # the classifier is not used


def face_similarity(generated: list[Image.Image], references: list[Image.Image], embed, seed: int = 0) -> dict | str:
    """Mean cosine of generated faces to reference faces, with interval and counts; a string saying why
    when it cannot be measured."""
    ref_crops = [c for c in (face_crop(im) for im in references) if c is not None]
    if not ref_crops:
        return "not measured: no face found in the reference photos"
    gen_crops = [face_crop(im) for im in generated]
    found = [c for c in gen_crops if c is not None]
    if not found:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "face_rate": 0.0,
                "n_reference_faces": len(ref_crops)}  # fmt: skip
    ref = F.normalize(embed(ref_crops).float(), dim=-1)
    gen = F.normalize(embed(found).float(), dim=-1)
    per_image = (gen @ ref.T).mean(dim=1).tolist()
    return stats.summary(per_image, seed=seed) | {
        "face_rate": round(len(found) / len(generated), 6),
        "n_reference_faces": len(ref_crops),
    }
