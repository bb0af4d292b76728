"""Stochastic rounding into bf16 and dynamic loss scaling for fp16."""

from __future__ import annotations

from typing import Any

import torch

from lisa_dist.errors import LossScaleError
from lisa_dist.randomness import derived_seed


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 `x` to bf16 up or down with probability proportional to the distance (unbiased).

    bf16 keeps the upper 16 bits of an fp32 value; adding uniform noise to the lower 16 bits before
    truncating them rounds the magnitude up with exactly the probability of the discarded fraction.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def rounding_generator(seed: int, step: int, rank: int, device: torch.device,
                       stream: str = "rounding") -> torch.Generator:
    """Fresh per step, so a resumed run draws the same noise without saving generator state; `stream` names
    draws kept apart from the others (lisa.inactive_update's)."""
    return torch.Generator(device=device).manual_seed(derived_seed(stream, seed, step, rank))


class DynamicLossScaler:
    """Halve the scale on overflow (the step is skipped), double it after `window` finite steps."""

    def __init__(self, init_scale: float, window: int, min_scale: float, enabled: bool) -> None:
        self.scale = init_scale if enabled else 1.0
        self.window = window
        self.min_scale = min_scale
        self.enabled = enabled
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            if self.scale < self.min_scale:
                raise LossScaleError(f"fp16 loss scale fell to {self.scale} below train.min_loss_scale="
                                     f"{self.min_scale}: gradients overflow even unscaled")
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
