"""What the training code reads when `estimate` runs it on fake tensors: shapes and dtypes, no values."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lisa_dist._compat import is_fake, unset_fake_temporarily
from lisa_dist.models.parts import SampledUnit
from lisa_dist.sampler import OutlierStrategy, Strategy
from lisa_dist.values import Values


class ShapesOnly(Values):
    """A fake tensor reads as a stand-in number; sums over ranks are the local ones (no collective moves
    data under the fake process group, and one would keep the step's activations referenced); the data
    order, the layer draw and shard offsets run on real tensors; the layer draw trains the heaviest units."""

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

    def sampling(self, strategy: Strategy, units: list[SampledUnit]) -> Strategy:
        return LargestUnits(strategy, unit_sizes(units))


@dataclass(frozen=True, slots=True)
class UnitSize:
    """What training one LISA unit holds, in parameter elements."""

    trained: int
    """Elements it updates: optimizer state and fp32 masters exist for these."""
    group: str
    """Units of one group share their gradients: a layer's routed experts (one stacked tensor per weight)."""
    gradients: int
    """Elements that get gradients while any unit of its group trains."""
    expert: int | None = None
    """A routed expert's index in its layer; None for other units."""


def unit_sizes(units: list[SampledUnit]) -> list[UnitSize]:
    return [UnitSize(u.numel(), u.name if u.expert is None else f"{u.layer}.experts", u.gradient_numel(), u.expert)
            for u in units]


def heaviest_draw(sizes: list[UnitSize], gamma: int, preferred: Collection[int] = ()) -> tuple[int, ...]:
    """The gamma units whose training holds the most: one at a time, the unit that brings the most new gradient
    elements (an expert of a layer none of whose experts is chosen yet brings the layer's whole stacks), then the
    most trained elements, then the lowest expert index (rank 0 holds a layer's first experts on both engines,
    and `estimate` measures rank 0), then one of `preferred`, then the last (backward starts at the last
    layer, with every layer's activations held). For layers (or blocks) this is the gamma largest."""
    chosen: list[int] = []
    taken: set[int] = set()
    groups: set[str] = set()
    for _ in range(min(gamma, len(sizes))):
        u = min((u for u in range(len(sizes)) if u not in taken),
                key=lambda u: (-(sizes[u].group not in groups) * sizes[u].gradients, -sizes[u].trained,
                               sizes[u].expert or 0, u not in preferred, -u))
        chosen.append(u)
        taken.add(u)
        groups.add(sizes[u].group)
    return tuple(sorted(chosen))


def draw_elements(sizes: list[UnitSize], chosen: Collection[int]) -> tuple[int, int]:
    """(trained elements, elements with gradients) of the units `chosen`."""
    groups = {sizes[u].group: sizes[u].gradients for u in chosen}
    return sum(sizes[u].trained for u in chosen), sum(groups.values())


def rank_trained_elements(sizes: list[UnitSize], chosen: Collection[int], world_size: int) -> tuple[float, int]:
    """Trained elements on the rank that holds the most of them: (those spread evenly, the experts'). Routed
    experts are not spread over the ranks: FSDP2 shards a stacked parameter by expert and ZeRO-3 by flat
    partition, so a rank holds up to ceil(E / n) of a layer's E experts' elements, and a draw's experts can all
    be there."""
    spread, experts = 0.0, {}
    for u in chosen:
        if sizes[u].expert is None:
            spread += sizes[u].trained / world_size
        else:
            experts.setdefault(sizes[u].group, []).append(sizes[u].trained)
    per_layer = {group: sum(size.expert is not None for size in sizes if size.group == group) for group in experts}
    return spread, sum(sum(sorted(drawn, reverse=True)[:-(-per_layer[group] // world_size)])
                       for group, drawn in experts.items())


class LargestUnits(Strategy):
    """`estimate`'s view of another strategy: its peak must hold for any draw, so each interval trains the
    heaviest draw (`heaviest_draw`), preferring units `inner` draws (units of one size, such as layers, are
    then exactly the inner draw)."""

    def __init__(self, inner: Strategy, sizes: list[UnitSize]) -> None:
        self.inner, self.sizes = inner, sizes
        self.num_units, self.gamma, self.seed, self.weights = inner.num_units, inner.gamma, inner.seed, inner.weights
        self.name = inner.name
        if isinstance(inner, OutlierStrategy) and inner.ratios is None:
            inner.calibrate([1.0] * inner.num_units)  # weights without values have no outliers to count

    def choose(self, interval_index: int) -> tuple[int, ...]:
        return heaviest_draw(self.sizes, self.gamma, set(self.inner.choose(interval_index)))
