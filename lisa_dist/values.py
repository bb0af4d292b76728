"""How training code reads what its tensors hold: the one object that `lisa-dist estimate` swaps.

The core, its step runner, its optimizer and the engines are given a `Values`. This one reads tensors as
they are; `lisa_dist.sizing.shapes.ShapesOnly` stands in when the step runs on tensors that carry shapes
and dtypes but no values, and is the only place that knows about them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from lisa_dist.distributed import all_reduce_tensor

if TYPE_CHECKING:
    from lisa_dist.models.parts import SampledUnit
    from lisa_dist.sampler import Strategy


class Values:
    has_data = True
    """Whether tensors hold values (weights to read into them, numbers to check)."""

    def item(self, t: torch.Tensor | float, stand_in: float = 1.0) -> float:
        """`t` as a Python number (`stand_in` where tensors have no values)."""
        return t.item() if isinstance(t, torch.Tensor) else float(t)

    def items(self, t: torch.Tensor, stand_in: float = 1.0) -> list[float]:
        return t.tolist()

    def sum_over_ranks_on_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over every rank in one collective, left on the device: no host read."""
        total = t.clone()
        all_reduce_tensor(total)
        return total

    def read_sum_over_ranks(self, t: torch.Tensor, stand_in: float = 0.0) -> list[float]:
        """`t`, a vector on the device, summed over every rank in one collective and read to the host in one
        transfer (a step's one sync: everything it reports travels in this vector)."""
        return self.items(self.sum_over_ranks_on_device(t.to(torch.float64)), stand_in)

    @contextmanager
    def real_tensors(self) -> Iterator[None]:
        """Context for work whose numbers must be real wherever the step runs: the data order, the layer
        draw, shard offsets."""
        yield

    def sampling(self, strategy: Strategy, units: list[SampledUnit]) -> Strategy:
        """The strategy whose draws the core trains over `units`."""
        return strategy


READ = Values()
"""Values read as they are: every run but `estimate`."""
