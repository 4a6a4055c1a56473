"""F-LMM's schedule: linear warm-up from 1e-5× over 3% of steps, cosine to 0; clipping."""

import math

import pytest
import torch
from torch import nn

from flmm.optim import OptimConfig, build_optimizer, lr_factor, step


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    cfg = OptimConfig()
    total = 1000  # warm-up = 30 steps
    assert lr_factor(0, total, cfg) == pytest.approx(1e-5)
    assert lr_factor(15, total, cfg) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)
    assert lr_factor(30, total, cfg) == pytest.approx(1.0)
    mid = 30 + (total - 30) // 2
    assert lr_factor(mid, total, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 485 / 970)))
    assert lr_factor(total, total, cfg) == pytest.approx(0.0, abs=1e-12)


def test_step_clips_the_gradient_and_advances_the_lr():
    cfg = OptimConfig(lr=1e-2)
    model = nn.Linear(4, 1)
    frozen = nn.Linear(4, 1).requires_grad_(False)
    both = nn.ModuleList([model, frozen])
    optim, schedule = build_optimizer(both, total_steps=100, config=cfg)
    assert len(optim.param_groups[0]["params"]) == 2  # only the trainable ones
    loss = (model(torch.full((8, 4), 100.0)) ** 2).mean()
    norm = step(loss, both, optim, schedule, cfg)
    assert norm > cfg.grad_clip
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert clipped == pytest.approx(cfg.grad_clip, rel=1e-4)
    assert optim.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(1, 100, cfg))
