"""What every sharding engine shares; each engine implements the rest in one module (`fsdp2.py`, `zero3.py`)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lisa_dist._compat import enable_activation_checkpointing
from lisa_dist.config import Config
from lisa_dist.distributed import Runtime, in_place_sum
from lisa_dist.engines.interfaces import CheckpointLayout, MemoryProbe, ShardAccess
from lisa_dist.models import ModelParts, ModelSource, find_parts
from lisa_dist.models.parts import layer_blocks
from lisa_dist.values import READ, Values


class Engine(ShardAccess, CheckpointLayout, MemoryProbe):
    """The life cycle the training core drives (build or adopt the sharded model, the gradient units,
    backward, forwards without one), and the three views other callers have (`interfaces.py`)."""

    name: str
    saves_parameters_by_reference = False
    """Whether views of parameters saved for backward must be kept by reference (`lisa_dist.offload`): the
    engine releases a gathered parameter by replacing its data, not by freeing the storage."""

    def __init__(self, config: Config, runtime: Runtime, mesh: DeviceMesh | None = None,
                 values: Values = READ) -> None:
        """`mesh`: the ranks to shard over (default: the whole world, built when sharding starts).
        `values`: how tensors are read; where they have no data (`lisa-dist estimate`) no weights are read."""
        self.config = config
        self.runtime = runtime
        self.mesh = mesh
        self.values = values
        self.model: nn.Module | None = None
        self.parts: ModelParts | None = None
        self._group_sums: dict[Any, Callable[[torch.Tensor], None]] = {}

    def group_sum(self, group: Any) -> Callable[[torch.Tensor], None]:
        """The in-place sum over `group` for its parameters' `ShardInfo`s: one function per group, so a rule
        can tell which shards' statistics may travel in one collective."""
        if group not in self._group_sums:
            self._group_sums[group] = in_place_sum(self.runtime.device, group)
        return self._group_sums[group]

    def world_mesh(self) -> DeviceMesh:
        """The mesh to shard over: the one given, else (built once) every rank of the world."""
        if self.mesh is None:
            self.mesh = init_device_mesh(self.runtime.device.type, (self.runtime.world_size,))
        return self.mesh

    @abstractmethod
    def build(self, source: ModelSource) -> tuple[nn.Module, ModelParts]:
        """Construct the model sharded over the world and load (or randomly initialize) this rank's shards."""

    @abstractmethod
    def adopt(self, model: nn.Module) -> tuple[nn.Module, ModelParts]:
        """Shard a model someone else built with real weights (a Hugging Face Trainer script's model),
        exactly as `build` shards its own."""

    def _find_parts(self, model: nn.Module) -> ModelParts:
        """The model's layers and heads, with activation checkpointing turned on when configured."""
        parts = find_parts(model)
        if self.config.model.activation_checkpointing:
            enable_activation_checkpointing(model)
        return parts

    def grad_units(self) -> list[list[nn.Parameter]]:
        """The model's parameters by sharding unit (`sharding_units`): the gradient shards of one unit reach
        the hooks one after another, so the fused update can take them together (one collective for their
        statistics instead of one per parameter). The root's leftovers (with tied embeddings: the embedding
        and the final norm) are one parameter each: on ZeRO-3 their gradients come at opposite ends of
        backward."""
        claimed: set[int] = set()
        units = []
        for unit in sharding_units(self.parts, self.config.engine.split_layers):
            modules = unit if isinstance(unit, list) else [unit]
            params = [p for m in modules for p in m.parameters() if id(p) not in claimed]
            claimed.update(id(p) for p in params)
            if params:
                units.append(params)
        return units + [[p] for p in self.model.parameters() if id(p) not in claimed]

    @classmethod
    def check_config(cls, config: Config, world_size: int) -> None:
        """Engine-specific configuration checks, run before any process group exists."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def after_forward_only(self) -> None:
        """After forwards without a backward (evaluation): release whatever a backward would have released."""


def sharding_units(parts: ModelParts, split_layers: bool) -> list[nn.Module | list[nn.Module]]:
    """One unit per decoder layer, and (untied) the embeddings and [final norm, head] as their own units:
    the head's gradients are then reduced and released as soon as backward leaves it, instead of living
    through the whole backward in the root unit. With `split_layers` (FSDP2) the attention and MLP blocks of
    each layer are units of their own, listed before their layer (smaller gathered and reduced buffers).
    A parameter belongs to the first unit that holds it, as with FSDP2's nested `fully_shard`."""
    units: list[nn.Module | list[nn.Module]] = []
    for layer in parts.layers:
        if split_layers:
            units += [block for _, block in layer_blocks(layer)]
        units.append(layer)
    if not parts.tied_embeddings:
        units.append(list(parts.embeddings))
        units.append([m for m in (parts.norm, parts.head) if m is not None])
    return units


def trainable_named_parameters(model: nn.Module) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
