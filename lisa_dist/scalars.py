"""Python numbers from tensors, also when `lisa-dist estimate` runs the step on fake tensors."""

from __future__ import annotations

import torch
from lisa_dist._compat import is_fake, unset_fake_temporarily

real_tensors = unset_fake_temporarily
"""Context in which tensors are real even inside `estimate`'s FakeTensorMode (data order, layer schedule)."""


def item(t: torch.Tensor | float, fake_value: float = 1.0) -> float:
    """`t.item()`, or `fake_value` for a fake tensor (which has no data: the estimate only needs shapes)."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    return fake_value if is_fake(t) else t.item()


def items(t: torch.Tensor, fake_value: float = 1.0) -> list[float]:
    return [fake_value] * t.numel() if is_fake(t) else t.tolist()
