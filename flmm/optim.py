"""F-LMM's optimisation recipe for the heads: AdamW, linear warm-up, cosine decay, grad clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    """Defaults from F-LMM: AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.01, clip 1.0,
    warm-up over the first 3% of steps from 1e-5 × lr, then cosine to 0. selector_lr_scale
    multiplies the lr of the keyword selector's parameters (``selector.*``, any wrapper prefix):
    a small tagger trained beside the heads sees one caption per image and needs larger steps."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_fraction: float = 0.03
    warmup_start_factor: float = 1e-5
    selector_lr_scale: float = 10.0  # ours (F-LMM has no selector): see toyworld/README.md


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total_steps``."""
    warmup = max(1, round(config.warmup_fraction * total_steps))
    if step < warmup:
        start = config.warmup_start_factor
        return start + (1 - start) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    module: nn.Module, total_steps: int, config: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``module``'s trainable parameters and its per-step schedule: one parameter
    group at ``config.lr``, and the keyword selector's (if any) in a second group at
    ``config.lr × config.selector_lr_scale``."""
    heads, selector = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (selector if "selector" in name.split(".") else heads).append(p)
    groups = [{"params": heads, "lr": config.lr}]
    if selector:
        groups.append({"params": selector, "lr": config.lr * config.selector_lr_scale})
    optim = torch.optim.AdamW(groups, betas=config.betas, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda step: lr_factor(step, total_steps, config)
    )
    return optim, schedule


def step(
    loss: torch.Tensor,
    module: nn.Module,
    optim: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    config: OptimConfig,
) -> float:
    """Backward, clip, step, advance the schedule; returns the pre-clip gradient norm."""
    optim.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in module.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optim.step()
    schedule.step()
    return float(norm)
