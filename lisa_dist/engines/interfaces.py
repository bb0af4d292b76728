"""The engine as each of its callers sees it. An engine (`base.Engine`) implements all three; each caller is
typed by, and calls, only its own:

- `ShardAccess`: the optimizer (`optim.sharded_optimizer`, its in-backward hooks in `optim.fused`) and the
  importance measures (`importance.py`): each rank's shards, their gradients and where they sit.
- `CheckpointLayout`: `checkpoint.py` and the final export: the shards in the form DCP saves and reshards,
  and the whole model on rank 0.
- `MemoryProbe`: the trainer's per-step memory figures.

The training core drives the rest (`base.Engine`): building or adopting the model, backward, the units.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from lisa_dist.distributed import Runtime
    from lisa_dist.optim.shard_info import ShardInfo


class ShardAccess(Protocol):
    @abstractmethod
    def local_shard(self, param: nn.Parameter) -> torch.Tensor:
        """This rank's slice of `param`, sharing storage with it."""

    @abstractmethod
    def local_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        """This rank's slice of `param`'s reduced gradient, or None if it has none."""

    @abstractmethod
    def shard_info(self, param: nn.Parameter) -> ShardInfo:
        """Where this rank's shard sits in `param`, and how to sum small tensors over its ranks."""

    def release_grad(self, param: nn.Parameter) -> None:
        """Drop this rank's gradient of `param` (after its update, or when a step is skipped)."""
        param.grad = None

    @abstractmethod
    def register_grad_hook(self, param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> RemovableHandle:
        """Call `hook(param)` as soon as this rank's reduced gradient shard of `param` is ready."""


class CheckpointLayout(Protocol):
    name: str
    """The engine.name a checkpoint records: another engine's layout is read tensor by tensor."""
    model: nn.Module | None

    @abstractmethod
    def checkpoint_state(self, optim_state: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """{"model": ..., "optim": ...} of DTensors sharing storage with this rank's shards, so that
        torch.distributed.checkpoint saves them and loads into them in place (and reshards)."""

    @classmethod
    def checkpoint_shapes(cls, skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
        """Shape of each model tensor as `checkpoint_state` stores it, for a single-process export."""
        return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    def after_load(self) -> None:
        """Drop anything derived from the shards before a checkpoint was loaded into them."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Unsharded CPU tensors on rank 0 (None elsewhere), for exporting an HF directory."""


class MemoryProbe(Protocol):
    runtime: Runtime
    model: nn.Module | None

    def resident_tensors(self) -> list[torch.Tensor]:
        """Long-lived tensors this rank holds for the model (for CPU storage accounting)."""
        return list(self.model.parameters())

    def reset_peak_memory(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.runtime.device)

    def peak_memory_bytes(self) -> int | None:
        """The allocator's peak since the last reset on GPU; None where the trainer must track storages."""
        if self.runtime.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.runtime.device)
        return None
