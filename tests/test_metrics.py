"""Metric functions against hand computation."""

from __future__ import annotations

import pytest
import torch

from posebooth.backbones import ClipEmbedder, DinoEmbedder, is_stand_in, lpips_distance
from posebooth.metrics import mean_matched_cosine, mean_pairwise_cosine, mean_pairwise_lpips


def test_pairwise_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert mean_pairwise_cosine(a, a) == pytest.approx(0.5)  # two 1s and two 0s
    assert mean_pairwise_cosine(a[:1], a[:1] * 3) == pytest.approx(1.0)
    assert mean_pairwise_cosine(a[:1], -a[:1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(a[:0], a)


def test_matched_cosine_by_hand():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert mean_matched_cosine(img, txt) == pytest.approx((1.0 + 2**-0.5) / 2)
    with pytest.raises(ValueError, match="CLIP-T needs matching"):
        mean_matched_cosine(img, txt[:1])


def test_lpips_diversity():
    lp = lpips_distance("random-alex")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    same, pairs = mean_pairwise_lpips([torch.cat([x, x, x])], lp)
    assert same == pytest.approx(0.0, abs=1e-6) and pairs == 3
    diff, pairs = mean_pairwise_lpips([torch.cat([x, y]), x], lp)  # the single-image group adds no pair
    assert diff > 0 and pairs == 1
    assert mean_pairwise_lpips([x], lp) == (None, 0)


def test_identical_images_score_one_with_stand_in_backbones(offline_env):
    from PIL import Image

    img = Image.new("RGB", (48, 48), (200, 30, 30))
    other = Image.new("RGB", (48, 48), (10, 10, 240))
    clip, dino = ClipEmbedder("embedded:tiny-clip"), DinoEmbedder("embedded:tiny-dino")
    for emb in (clip.images, dino.images):
        e = emb([img, other])
        assert mean_pairwise_cosine(e[:1], e[:1]) == pytest.approx(1.0, abs=1e-5)
        assert mean_pairwise_cosine(e[:1], e[1:]) < 0.9999
    t = clip.texts(["a photo of a robot", "a cat"])
    assert t.shape == (2, clip.model.config.projection_dim)
    assert is_stand_in("embedded:tiny-clip") and is_stand_in("random-alex") and not is_stand_in("facebook/dino-vits16")


def test_real_backbone_offline_fails_clearly(offline_env):
    with pytest.raises(OSError, match=r"metric backbone 'facebook/dino-vits16' is not on this machine.*hf download"):
        DinoEmbedder("facebook/dino-vits16")
