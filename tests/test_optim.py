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


def test_the_selectors_parameters_get_their_own_lr_whatever_wraps_them():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = nn.Linear(4, 4)
            self.selector = nn.Linear(4, 3)

    cfg = OptimConfig(lr=1e-3, selector_lr_scale=7.0)
    wrapped = nn.ModuleDict({"module": Heads()})  # as DDP names them: module.selector.*
    optim, _ = build_optimizer(wrapped, total_steps=100, config=cfg)
    heads, selector = optim.param_groups
    assert {id(p) for p in heads["params"]} == {id(p) for p in wrapped["module"].unet.parameters()}
    assert {id(p) for p in selector["params"]} == {
        id(p) for p in wrapped["module"].selector.parameters()
    }
    assert selector["initial_lr"] == pytest.approx(7 * heads["initial_lr"])
    assert heads["initial_lr"] == pytest.approx(1e-3)
    only_heads, _ = build_optimizer(nn.Linear(4, 4), total_steps=100, config=cfg)
    assert len(only_heads.param_groups) == 1
