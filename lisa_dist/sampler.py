"""LISA's layer schedule: which decoder layers train in each interval.

The choice is a pure function of (seed, interval index, num_layers, gamma, weights) drawn from its own
generator, so every rank computes it independently and a resume recomputes it exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.scalars import real_tensors


def _interval_seed(seed: int, interval_index: int) -> int:
    digest = hashlib.sha256(f"lisa_dist/sampler/{seed}/{interval_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_active_layers(
    seed: int,
    interval_index: int,
    num_layers: int,
    gamma: int,
    weights: list[float] | None = None,
) -> tuple[int, ...]:
    """Choose `gamma` of `num_layers` layers without replacement, proportionally to `weights`."""
    if not 1 <= gamma <= num_layers:
        raise ConfigError(f"lisa.gamma must be between 1 and the number of decoder layers ({num_layers}), got {gamma}")
    with real_tensors():
        return _sample(seed, interval_index, num_layers, gamma, weights)


def _sample(seed: int, interval_index: int, num_layers: int, gamma: int, weights: list[float] | None) -> tuple[int, ...]:
    if weights is None:
        probs = torch.ones(num_layers, dtype=torch.float64)
    else:
        if len(weights) != num_layers:
            raise ConfigError(f"lisa.layer_weights has {len(weights)} entries but the model has {num_layers} decoder layers")
        probs = torch.tensor(weights, dtype=torch.float64)
        if (probs < 0).any() or int((probs > 0).sum()) < gamma:
            raise ConfigError(f"lisa.layer_weights needs at least gamma={gamma} positive weights, got {weights}")
    generator = torch.Generator().manual_seed(_interval_seed(seed, interval_index))
    chosen = torch.multinomial(probs, gamma, replacement=False, generator=generator)
    return tuple(sorted(chosen.tolist()))


class LayerSampler:
    """Tracks the schedule's position; `full` training is the degenerate case of all layers always."""

    def __init__(
        self,
        num_layers: int,
        gamma: int,
        interval: int,
        seed: int,
        weights: list[float] | None = None,
        method: str = "lisa",
    ) -> None:
        if interval < 1:
            raise ConfigError(f"lisa.interval must be >= 1, got {interval}")
        self.num_layers = num_layers
        self.gamma = num_layers if method == "full" else gamma
        self.interval = interval
        self.seed = seed
        self.weights = weights
        self.method = method
        if method == "lisa":
            sample_active_layers(seed, 0, num_layers, gamma, weights)  # validates early
        self.step = 0
        """The next optimizer step to run."""

    def interval_index(self, step: int) -> int:
        return step // self.interval

    def is_switch(self, step: int) -> bool:
        """True on the first step of an interval, where the active set may change."""
        return self.method == "lisa" and step % self.interval == 0

    def active_layers(self, step: int) -> tuple[int, ...]:
        if self.method == "full":
            return tuple(range(self.num_layers))
        return sample_active_layers(self.seed, self.interval_index(step), self.num_layers, self.gamma, self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "seed": self.seed, "num_layers": self.num_layers, "gamma": self.gamma,
            "interval": self.interval, "weights": self.weights, "step": self.step,
            "active_layers": list(self.active_layers(self.step)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("method", "seed", "num_layers", "gamma", "interval", "weights"):
            if state[key] != mine[key]:
                raise CheckpointError(
                    f"checkpoint was written with sampler {key}={state[key]!r} but this run has {mine[key]!r}; "
                    "resuming would change the layer schedule")
        self.step = int(state["step"])
        if list(self.active_layers(self.step)) != list(state["active_layers"]):
            raise CheckpointError("checkpoint's active layers do not match the recomputed schedule")
