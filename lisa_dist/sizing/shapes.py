"""What the training code reads when `estimate` runs it on fake tensors: shapes and dtypes, no values."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lisa_dist._compat import is_fake, unset_fake_temporarily
from lisa_dist.sampler import OutlierStrategy, Strategy
from lisa_dist.values import Values


class ShapesOnly(Values):
    """A fake tensor reads as a stand-in number; sums over ranks are the local ones (no collective moves
    data under the fake process group, and one would keep the step's activations referenced); the data
    order, the layer draw and shard offsets run on real tensors; the layer draw trains the largest units."""

    has_data = False

    def item(self, t: torch.Tensor | float, stand_in: float = 1.0) -> float:
        if isinstance(t, torch.Tensor) and is_fake(t):
            return stand_in
        with unset_fake_temporarily():
            return super().item(t)

    def items(self, t: torch.Tensor, stand_in: float = 1.0) -> list[float]:
        if is_fake(t):
            return [stand_in] * t.numel()
        with unset_fake_temporarily():
            return t.tolist()

    def sum_over_ranks_on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @contextmanager
    def real_tensors(self) -> Iterator[None]:
        with unset_fake_temporarily():
            yield

    def sampling(self, strategy: Strategy, unit_sizes: list[int]) -> Strategy:
        return LargestUnits(strategy, unit_sizes)


class LargestUnits(Strategy):
    """`estimate`'s view of another strategy: its peak must hold for any draw, so each interval trains the
    gamma largest units, preferring those `inner` draws (units of one size, such as layers, are then
    exactly the inner draw)."""

    def __init__(self, inner: Strategy, sizes: list[int]) -> None:
        self.inner, self.sizes = inner, sizes
        self.num_units, self.gamma, self.seed, self.weights = inner.num_units, inner.gamma, inner.seed, inner.weights
        self.name = inner.name
        if isinstance(inner, OutlierStrategy) and inner.ratios is None:
            inner.calibrate([1.0] * inner.num_units)  # weights without values have no outliers to count

    def choose(self, interval_index: int) -> tuple[int, ...]:
        drawn = set(self.inner.choose(interval_index))
        ranked = sorted(range(self.num_units), key=lambda u: (-self.sizes[u], u not in drawn, u))
        return tuple(sorted(ranked[:self.gamma]))
