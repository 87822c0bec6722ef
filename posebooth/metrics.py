"""Evaluation metrics as pure functions on embeddings and images (DreamBooth paper, section 4.1).

- DINO / CLIP-I: mean pairwise cosine similarity between generated and reference image embeddings.
- CLIP-T: mean cosine similarity between each image's CLIP embedding and its prompt's.
- LPIPS diversity: mean LPIPS distance between images generated for the same prompt (and pose).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def mean_pairwise_cosine(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine over all (generated, reference) pairs; embeddings (G, D) and (R, D)."""
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError("mean_pairwise_cosine needs at least one generated and one reference embedding")
    return (F.normalize(generated.float(), dim=-1) @ F.normalize(reference.float(), dim=-1).T).mean().item()


def mean_matched_cosine(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine between row i of ``image_emb`` (N, D) and row i of ``text_emb`` (N, D) (CLIP-T)."""
    if image_emb.shape != text_emb.shape or len(image_emb) == 0:
        raise ValueError(
            f"CLIP-T needs matching non-empty (N, D) inputs, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).mean().item()


def mean_pairwise_lpips(groups: list[torch.Tensor], distance) -> tuple[float | None, int]:
    """Mean LPIPS over all pairs within each group (images (K, 3, H, W) in [-1, 1]); returns (mean, pairs).

    ``distance(a, b)`` returns (P, 1, 1, 1) distances for (P, 3, H, W) batches, like ``lpips.LPIPS``.
    Groups with fewer than two images contribute no pairs; with no pairs at all the mean is ``None``.
    """
    firsts, seconds = [], []
    for g in groups:
        for i, j in itertools.combinations(range(len(g)), 2):
            firsts.append(g[i])
            seconds.append(g[j])
    if not firsts:
        return None, 0
    with torch.no_grad():
        d = distance(torch.stack(firsts), torch.stack(seconds))
    return d.flatten().mean().item(), len(firsts)


def scale_pose_keypoints(keypoints, from_size: tuple[int, int], to_size: tuple[int, int]):
    """(18, 3) keypoints on a ``from_size`` canvas moved to a ``to_size`` canvas the way ``render_pose``
    draws them: scaled to fit and centred (letterboxed), confidence kept."""
    import numpy as np

    kp = np.array(keypoints, dtype=np.float64)
    scale = min(to_size[0] / from_size[0], to_size[1] / from_size[1])
    kp[:, 0] = kp[:, 0] * scale + (to_size[0] - from_size[0] * scale) / 2
    kp[:, 1] = kp[:, 1] * scale + (to_size[1] - from_size[1] * scale) / 2
    return kp


def pck(predicted, target, alpha: float) -> float | None:
    """Percentage of Correct Keypoints: the share of the target's visible keypoints that the prediction has
    within ``alpha`` x the longer side of the target's keypoint bounding box (HumanSD-style pose adherence).

    ``predicted`` and ``target`` are (18, 3) arrays (x, y, confidence; confidence 0 = absent) on the same
    canvas; ``predicted`` may be ``None`` (no detection: every keypoint is missed). ``None`` when the target
    has fewer than two visible keypoints (no scale to measure against).
    """
    import numpy as np

    target = np.asarray(target, dtype=np.float64)
    vis = target[:, 2] > 0
    if vis.sum() < 2:
        return None
    if predicted is None:
        return 0.0
    predicted = np.asarray(predicted, dtype=np.float64)
    xy = target[vis, :2]
    scale = max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1]))
    if scale <= 0:
        return None
    dist = np.linalg.norm(predicted[vis, :2] - xy, axis=1)
    hit = (predicted[vis, 2] > 0) & (dist <= alpha * scale)
    return float(hit.mean())


def pose_adherence(detector, images: list, targets: list, alpha: float = 0.2) -> dict:
    """Detect the pose again on each generated image and compare it with its target pose (``Pose``).

    Returns PCK@alpha averaged over images (a missed detection scores 0), the detection rate, and the
    number of images behind them.
    """
    scores, detected = [], 0
    for image, target in zip(images, targets, strict=True):
        found = detector.detect(image)
        detected += found is not None
        target_kp = scale_pose_keypoints(target.keypoints, (target.width, target.height), image.size)
        score = pck(None if found is None else found.keypoints, target_kp, alpha)
        if score is not None:
            scores.append(score)
    return {
        "detector": detector.name,
        f"pck_{alpha}": round(sum(scores) / len(scores), 6) if scores else None,
        "detection_rate": round(detected / len(images), 6) if images else None,
        "n_images": len(images),
    }
