"""The optimizers beyond AdamW (``optimizer: prodigy | adafactor``): each builds, steps, and honours ``lr`` as
documented; unknown names are errors naming the key."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import yaml

from posebooth import config, training
from posebooth.config import ConfigError
from tests.test_config import ROOT, _load


def one_step(kind: str, lr: float, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(parameter before, after) one step of ``kind`` on a loss with a fixed gradient (1.0, -2.0, 0.5, -0.25)."""
    p = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.4]))  # 1-D: Adafactor keeps a full second moment
    before = p.detach().clone()
    opt = training.make_optimizer(groups(p) if groups else [p], lr, 0.0, kind)
    (p * torch.tensor([1.0, -2.0, 0.5, -0.25])).sum().backward()  # the gradient, by construction
    opt.step()
    return before, p.detach().clone()


def test_adafactor_steps_with_the_configured_lr():
    # Adafactor (Shazeer and Stern 2018) at its first step: β2 = 1 - 1^-0.8 = 0, so the second moment is g² and
    # the update g / |g| = sign(g); its RMS is 1 (not clipped at 1.0). relative_step and scale_parameter off:
    # the step is lr x sign(g), nothing else (relative_step would use min(1e-2, 1/√t) and ignore lr;
    # scale_parameter would multiply by the parameter's RMS).
    grad_sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    for lr in (1e-3, 5e-2):
        before, after = one_step("adafactor", lr)
        assert torch.allclose(before - after, lr * grad_sign, atol=1e-7)


def test_adafactor_honours_param_group_lrs():
    before, after = one_step("adafactor", 1.0, lambda p: [{"params": [p], "lr": 2e-3}])
    assert torch.allclose(before - after, 2e-3 * torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-7)


def test_prodigy_steps_and_lr_scales_its_step(caplog):
    with caplog.at_level(logging.WARNING, logger="posebooth.training"):
        before, after = one_step("prodigy", 1.0)
    assert not caplog.records  # lr 1.0: the convention, no warning
    step = before - after
    assert torch.isfinite(after).all() and step.abs().min() > 0  # every value moved
    assert (step.sign() == torch.tensor([1.0, -1.0, 1.0, -1.0])).all()  # downhill
    _, half = one_step("prodigy", 0.5)
    assert torch.allclose(before - half, 0.5 * step, rtol=1e-4)  # lr multiplies Prodigy's own step size


def test_prodigy_warns_about_an_adamw_learning_rate(caplog):
    with caplog.at_level(logging.WARNING, logger="posebooth.training"):
        one_step("prodigy", 1e-4)
    assert any("use lr 1.0" in r.getMessage() for r in caplog.records)


def test_unknown_optimizer_names_the_key(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in ("train", "train_pose"):
        bad = copy.deepcopy(params)
        bad[section]["optimizer"] = "lion"
        with pytest.raises(ConfigError, match=rf"{section}.optimizer: 'lion' is not allowed; choose one of .*prodigy"):
            _load(tmp_path, bad)
    for kind in config.OPTIMIZERS[2:]:  # the new ones load
        good = copy.deepcopy(params)
        good["train"]["optimizer"] = kind
        assert _load(tmp_path, good).train.optimizer == kind
    with pytest.raises(ValueError, match=r"optimizer: unknown optimizer 'lion'"):
        training.make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1.0, 0.0, "lion")
