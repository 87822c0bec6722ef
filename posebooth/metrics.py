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


def per_image_cosine(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(G,): for each generated embedding, its mean cosine to the references; their mean is
    ``mean_pairwise_cosine`` (DINO, CLIP-I, PRES per image, so each can carry an interval)."""
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError("per_image_cosine needs at least one generated and one reference embedding")
    return (F.normalize(generated.float(), dim=-1) @ F.normalize(reference.float(), dim=-1).T).mean(dim=1)


def matched_cosine(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(N,): cosine of image i with text i (CLIP-T per image)."""
    if image_emb.shape != text_emb.shape or len(image_emb) == 0:
        raise ValueError(
            f"CLIP-T needs matching non-empty (N, D) inputs, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def zero_shot_correct(image_emb: torch.Tensor, candidate_emb: torch.Tensor, truth: list[int | None]) -> list:
    """CLIP zero-shot classification: per image (N, D), 1.0 when the candidate text (C, D) nearest by cosine is
    ``truth[i]``, 0.0 when another, None where ``truth[i]`` is None (nothing to check)."""
    picked = (F.normalize(image_emb.float(), dim=-1) @ F.normalize(candidate_emb.float(), dim=-1).T).argmax(dim=1)
    return [None if t is None else float(int(p) == t) for p, t in zip(picked.tolist(), truth, strict=True)]


def pairwise_lpips(groups: list[torch.Tensor], distance) -> list[float]:
    """LPIPS of every pair within each group (images (K, 3, H, W) in [-1, 1]): the values behind
    ``mean_pairwise_lpips`` (DIV), one per pair."""
    firsts, seconds = [], []
    for g in groups:
        for i, j in itertools.combinations(range(len(g)), 2):
            firsts.append(g[i])
            seconds.append(g[j])
    if not firsts:
        return []
    with torch.no_grad():
        return distance(torch.stack(firsts), torch.stack(seconds)).flatten().tolist()


def lpips_to_references(generated: torch.Tensor, references: torch.Tensor, distance) -> list[float]:
    """For each generated image (G, 3, H, W), its mean LPIPS to the reference photos (R, 3, H, W)."""
    out = []
    with torch.no_grad():
        for image in generated:
            d = distance(image.unsqueeze(0).expand(len(references), -1, -1, -1), references)
            out.append(d.flatten().mean().item())
    return out


def scale_pose_keypoints(keypoints, from_size: tuple[int, int], to_size: tuple[int, int]):
    """(18, 3) keypoints on a ``from_size`` canvas moved to a ``to_size`` canvas the way ``render_pose``
    draws them: scaled to fit and centred (letterboxed), confidence kept."""
    import numpy as np

    kp = np.array(keypoints, dtype=np.float64)
    scale = min(to_size[0] / from_size[0], to_size[1] / from_size[1])
    kp[:, 0] = kp[:, 0] * scale + (to_size[0] - from_size[0] * scale) / 2
    kp[:, 1] = kp[:, 1] * scale + (to_size[1] - from_size[1] * scale) / 2
    return kp


def _visible_pair(predicted, target):
    """The common start of ``pck`` and ``oks``: ``None`` when the target has fewer than two visible keypoints
    (nothing to score), ``0.0`` when nothing was detected, else ``(predicted, visible target xy, mask)``."""
    import numpy as np

    target = np.asarray(target, dtype=np.float64)
    vis = target[:, 2] > 0
    if vis.sum() < 2:
        return None
    if predicted is None:
        return 0.0
    return np.asarray(predicted, dtype=np.float64), target[vis, :2], vis


def pck(predicted, target, alpha: float) -> float | None:
    """Percentage of Correct Keypoints: the share of the target's visible keypoints that the prediction has
    within ``alpha`` x the longer side of the target's keypoint bounding box (HumanSD-style pose adherence).

    ``predicted`` and ``target`` are (18, 3) arrays (x, y, confidence; confidence 0 = absent) on the same
    canvas; ``predicted`` may be ``None`` (no detection: every keypoint is missed). ``None`` when the target
    has fewer than two visible keypoints (no scale to measure against).
    """
    import numpy as np

    pair = _visible_pair(predicted, target)
    if not isinstance(pair, tuple):
        return pair
    predicted, xy, vis = pair
    scale = max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1]))
    if scale <= 0:
        return None
    dist = np.linalg.norm(predicted[vis, :2] - xy, axis=1)
    hit = (predicted[vis, 2] > 0) & (dist <= alpha * scale)
    return float(hit.mean())


def oks(predicted, target, sigmas) -> float | None:
    """Object keypoint similarity (COCO): mean over the target's visible keypoints of
    ``exp(-d² / (2 s² k²))`` with ``k = 2σ`` per keypoint and ``s²`` the area of the target's keypoint
    bounding box; a keypoint the prediction lacks contributes 0. ``None`` when the target has fewer than
    two visible keypoints; 0 for no detection."""
    import numpy as np

    pair = _visible_pair(predicted, target)
    if not isinstance(pair, tuple):
        return pair
    predicted, xy, vis = pair
    area = max(np.ptp(xy[:, 0]) * np.ptp(xy[:, 1]), 1.0)
    k = 2 * np.asarray(sigmas, dtype=np.float64)[vis]
    d2 = ((predicted[vis, :2] - xy) ** 2).sum(axis=1)
    sim = np.exp(-d2 / (2 * area * k**2)) * (predicted[vis, 2] > 0)
    return float(sim.mean())


def oks_ap(detections: list[tuple[float, float | None]]) -> float | None:
    """COCO-style keypoint AP with one target pose per image: ``detections`` holds per image (detection
    score, OKS with its target), score 0 and OKS 0 for a missed image. Detections are ranked by score; at
    each OKS threshold 0.50, 0.55, ... 0.95 a detection is a true positive when its OKS reaches the
    threshold; AP is the 101-point interpolated area under precision-recall, averaged over thresholds."""
    import numpy as np

    rows = [(score, o) for score, o in detections if o is not None]
    if not rows:
        return None
    n_targets = len(rows)
    found = sorted((r for r in rows if r[0] > 0), key=lambda r: -r[0])
    if not found:
        return 0.0
    values = np.array([o for _, o in found])
    aps = []
    for threshold in np.linspace(0.5, 0.95, 10):
        tp = np.cumsum(values >= threshold)
        precision = tp / np.arange(1, len(values) + 1)
        recall = tp / n_targets
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # interpolated: best precision to the right
        points = [precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in np.linspace(0, 1, 101)]
        aps.append(float(np.mean(points)))
    return float(np.mean(aps))


def keypoint_cosine(predicted, target) -> float | None:
    """Cosine similarity of the normalised keypoints both poses have: each set centred on its own mean
    and flattened; 1 for the same pose at any position and scale. ``None`` with fewer than two common
    keypoints or no detection."""
    import numpy as np

    if predicted is None:
        return None
    predicted, target = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    both = (predicted[:, 2] > 0) & (target[:, 2] > 0)
    if both.sum() < 2:
        return None
    a, b = predicted[both, :2], target[both, :2]
    a, b = (a - a.mean(0)).ravel(), (b - b.mean(0)).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return None
    return float(a @ b / (na * nb))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 6) if values else None


def pose_scores(found, target_kp, sigmas) -> dict:
    """Every pose-adherence score of one image: a detected pose (or None) against its target keypoints
    on the same canvas."""
    kp = None if found is None else found.keypoints
    score = 0.0 if kp is None else float(kp[kp[:, 2] > 0, 2].mean())
    return {"detected": kp is not None, "score": score, "pck_0.1": pck(kp, target_kp, 0.1),
            "pck_0.2": pck(kp, target_kp, 0.2), "oks": oks(kp, target_kp, sigmas),
            "cosine": keypoint_cosine(kp, target_kp)}  # fmt: skip


def summarise_pose_scores(rows: list[dict], seed: int = 0) -> dict:
    """Detection rate, PCK@0.1 and @0.2 (a miss scores 0), OKS AP, mean OKS, keypoint cosine (over
    detections), each per-image score with a 95 % bootstrap interval (``<name>_ci_low``/``_ci_high``), and
    the number of images behind them."""
    from posebooth.stats import bootstrap_ci

    out = {"detection_rate": round(sum(r["detected"] for r in rows) / len(rows), 6) if rows else None}
    for key, values in (("detection_rate", [float(r["detected"]) for r in rows]),
                        ("pck_0.1", [r["pck_0.1"] for r in rows]), ("pck_0.2", [r["pck_0.2"] for r in rows]),
                        ("mean_oks", [r["oks"] for r in rows]), ("keypoint_cosine", [r["cosine"] for r in rows])):  # fmt: skip
        if key != "detection_rate":
            out[key] = _mean(values)
        ci = bootstrap_ci(values, seed=seed)
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = (None, None) if ci is None else (round(ci[0], 6), round(ci[1], 6))
    ap = oks_ap([(r["score"], r["oks"]) for r in rows]) if rows else None
    out["oks_ap"] = None if ap is None else round(ap, 6)
    out["n_images"] = len(rows)
    return out


def pose_adherence(detector, images: list, targets: list, names: list[str] | None = None) -> dict:
    """Detect the pose again on each generated image and compare it with its target pose (``Pose``):
    overall and, with ``names`` (the target pose of each image), per target pose."""
    rows = []
    for image, target in zip(images, targets, strict=True):
        found = detector.detect(image)
        if found is not None and len(found.keypoints) != len(target.keypoints):
            found = None  # another skeleton than the target's: nothing to compare
        target_kp = scale_pose_keypoints(target.keypoints, (target.width, target.height), image.size)
        rows.append(pose_scores(found, target_kp, target.skeleton.sigmas or [0.05] * len(target.keypoints)))
    result = {"detector": detector.name, **summarise_pose_scores(rows)}
    if names is not None:
        result["per_pose"] = {
            n: summarise_pose_scores([r for r, m in zip(rows, names, strict=True) if m == n])
            for n in dict.fromkeys(names)
        }
    return result
