"""OWL's outlier ratio of each sampled unit, on sharded weights (for `lisa.strategy=outlier`, OwLore).

A weight W_ij of a linear layer scores |W_ij| * ||X_j||, where ||X_j|| is the L2 norm of input feature j
over the calibration tokens; a unit's outlier ratio is the share of its linear weights scoring above
`threshold` times the unit's mean score. Each rank sums X_j^2 over its own tokens (reduced), then scores
and counts only its shards (reduced again), so nothing is gathered beyond what a forward gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lisa_dist.optim.shard_info import outer_slice
from lisa_dist.engines.interfaces import ShardAccess


def linear_modules(module: nn.Module) -> list[nn.Module]:
    """The linear layers of a unit: nn.Linear (weight [out, in]) and GPT-2's Conv1D (weight [in, out])."""
    return [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    weight = module.weight  # a ZeRO-3 partitioned weight keeps its real shape in ds_shape
    return tuple(getattr(weight, "ds_shape", weight.shape))


def _in_features(module: nn.Module) -> int:
    shape = _weight_shape(module)
    return shape[1] if isinstance(module, nn.Linear) else shape[0]


class InputNorms:
    """Sums of squared inputs per input feature of each linear layer, over the forwards run inside `record`.
    Tokens where `mask` (set per micro-batch) is 0 are left out: padding is no calibration data."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.modules = modules
        self.sums = {m: torch.zeros(_in_features(m), dtype=torch.float64, device=device) for m in modules}
        self.mask: torch.Tensor | None = None

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach()
        if self.mask is not None and x.shape[:-1] == self.mask.shape:
            x = x[self.mask.to(torch.bool)]
        self.sums[module] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)

    @contextmanager
    def record(self) -> Iterator[InputNorms]:
        handles = [m.register_forward_hook(self._hook) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def flat(self) -> torch.Tensor:
        return torch.cat([self.sums[m] for m in self.modules])

    def load_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for m in self.modules:
            n = self.sums[m].numel()
            self.sums[m] = flat[offset:offset + n]
            offset += n


def _scores(module: nn.Module, access: ShardAccess, sum_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j|| over this rank's shard of the module's weight, flat, in fp32."""
    param = module.weight
    info = access.shard_info(param)
    shard = access.local_shard(param).reshape(-1)[:info.numel]
    _, rows, cols = info.matrix  # linear weights: one matrix
    norm = sum_sq.sqrt().float().to(shard.device)
    if isinstance(module, nn.Linear):  # [out, in]: feature j is the column
        factor = outer_slice(torch.ones(rows, device=shard.device), norm, info.flat_start, info.numel)
    else:  # Conv1D [in, out]: feature j is the row
        factor = outer_slice(norm, torch.ones(cols, device=shard.device), info.flat_start, info.numel)
    return shard.float().abs().mul_(factor)


def outlier_ratios(unit_modules: list[list[nn.Module]], access: ShardAccess, norms: InputNorms,
                   threshold: float, reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
    """Each unit's share of linear weights scoring above `threshold` times the unit's mean score, from
    `norms` already summed over every rank's tokens; `reduce` sums a float64 vector over the ranks."""
    local = torch.zeros(2, len(unit_modules), dtype=torch.float64)
    for u, modules in enumerate(unit_modules):
        for m in modules:
            local[0, u] += torch.sum(_scores(m, access, norms.sums[m]), dtype=torch.float64).cpu()
            local[1, u] += access.shard_info(m.weight).numel
    score_sums, numels = reduce(local)
    limits = threshold * score_sums / numels
    # Scored again rather than kept: keeping every unit's scores until the reduce would hold a second
    # copy of all this rank's decoder shards in fp32.
    counts = torch.zeros(len(unit_modules), dtype=torch.float64)
    for u, modules in enumerate(unit_modules):
        for m in modules:
            counts[u] += int((_scores(m, access, norms.sums[m]).double() > limits[u]).sum())
    return (reduce(counts) / numels).tolist()
