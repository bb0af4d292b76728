"""Learning rate as a pure function of the step, so resume needs no scheduler state."""

from __future__ import annotations

import math

from lisa_dist.config import OptimConfig


def lr_at(c: OptimConfig, step: int, max_steps: int) -> float:
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.schedule == "constant":
        return c.lr
    span = max(1, max_steps - c.warmup_steps)
    progress = min(1.0, (step - c.warmup_steps) / span)
    floor = c.lr * c.min_lr_ratio
    if c.schedule == "linear":
        return floor + (c.lr - floor) * (1 - progress)
    return floor + (c.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
