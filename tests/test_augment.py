"""Training views (random zoomed crops) and the face-region loss weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from posebooth import augment, training
from posebooth.diffusion import prior_preservation_loss
from posebooth.images import to_tensor
from tests.conftest import ROOT


def test_crop_views_are_deterministic_for_a_seed_and_keep_view_zero():
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    a, _, _ = augment.crop_views(pixels, [None] * 3, 4, 0.5, torch.Generator().manual_seed(0))
    b, _, _ = augment.crop_views(pixels, [None] * 3, 4, 0.5, torch.Generator().manual_seed(0))
    c, _, _ = augment.crop_views(pixels, [None] * 3, 4, 0.5, torch.Generator().manual_seed(1))
    assert a.shape == (3, 5, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 0], pixels)  # view 0 is the image itself
    assert all(not torch.equal(a[:, k], pixels) for k in range(1, 5))


def test_no_crops_draw_no_random_numbers():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    views, boxes, _ = augment.crop_views(torch.zeros(2, 3, 8, 8), [None, (1, 1, 4, 4)], 0, 0.8, g)
    assert views.shape == (2, 1, 3, 8, 8) and boxes == [[None], [(1, 1, 4, 4)]]
    assert torch.equal(g.get_state(), state)  # runs without crops train exactly as before


def test_a_crop_is_a_zoom_and_the_face_box_follows_it():
    # A white square on black: wherever the crop falls, the box drawn from the crop parameters must
    # cover the white square's new place.
    pixels = -torch.ones(1, 3, 64, 64)
    pixels[:, :, 20:36, 24:40] = 1.0
    views, boxes, _ = augment.crop_views(pixels, [(24, 20, 40, 36)], 6, 0.6, torch.Generator().manual_seed(3))
    for k in range(1, 7):
        box = boxes[0][k]
        white = (views[0, k, 0] > 0).nonzero()
        if box is None:
            assert len(white) == 0
            continue
        (y0, x0), (y1, x1) = white.min(0).values.tolist(), white.max(0).values.tolist()
        assert box[0] == pytest.approx(x0, abs=2) and box[1] == pytest.approx(y0, abs=2)
        assert box[2] == pytest.approx(x1 + 1, abs=2) and box[3] == pytest.approx(y1 + 1, abs=2)
        assert box[2] - box[0] > 16  # zoomed in: the square is bigger than it was


def test_box_mask_covers_the_box_in_latent_cells():
    mask = augment.box_mask((8, 0, 24, 12), 32, 4)  # cells of 8 px
    expected = torch.tensor([[0, 1, 1, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(mask[0], expected)
    assert augment.box_mask(None, 32, 4).sum() == 0


def test_face_loss_weight_multiplies_the_error_inside_the_box_only():
    pred, target = torch.ones(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    weights = 1 + 3.0 * augment.box_mask((0, 0, 16, 16), 32, 4).unsqueeze(0)  # top-left quarter x4
    loss, _, _ = prior_preservation_loss(pred, target, 1.0, False, weights)
    assert loss.item() == pytest.approx((4 * 4 + 12 * 1) / 16)


def test_loss_and_step_combines_face_map_and_min_snr():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    p = torch.nn.Parameter(torch.zeros(1))
    t = SimpleNamespace(snr_gamma=5.0, prior_loss_weight=1.0, max_grad_norm=1e9, lr=0.1, weight_decay=0.0,
                        optimizer="adamw", lr_scheduler="constant", lr_warmup_steps=0, steps=1,
                        gradient_accumulation_steps=1, gradient_checkpointing=False)  # fmt: skip
    acc, _, opt, sched = training.prepare([torch.nn.Linear(1, 1)], [p], t, "cpu", "fp32")
    sched_ = DDPMScheduler()
    ts = torch.tensor([0, 999])
    pred = (torch.ones(2, 4, 2, 2) + p).requires_grad_()
    loss_map = torch.ones(2, 1, 2, 2)
    loss_map[0, 0, 0, 0] = 5.0
    losses, _ = training.loss_and_step(acc, sched_, pred, torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), ts,
                                       False, t, [p], opt, sched, loss_map)  # fmt: skip
    from posebooth.diffusion import min_snr_weights

    snr_w = min_snr_weights(sched_, ts, 5.0)
    expected = (snr_w[0] * (1 + 1 + 1 + 5) / 4 + snr_w[1]) / 2
    assert losses[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_face_boxes_find_a_real_face_and_none_on_the_robot():
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skimage_data.astronaut()).resize((256, 256))  # a portrait shipped with scikit-image
    robot = Image.open(ROOT / "data" / "subject" / "robot_01.jpg").convert("RGB").resize((256, 256))
    boxes = augment.face_boxes(torch.stack([to_tensor(photo), to_tensor(robot)]))
    assert boxes[1] is None
    x0, y0, x1, y1 = boxes[0]
    assert 100 < (x0 + x1) / 2 < 160 and 30 < (y0 + y1) / 2 < 110  # the astronaut's face, upper middle
    assert np.isfinite([x0, y0, x1, y1]).all()
