"""The small interface training code uses; each sharding engine implements it in one module."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from lisa_dist.config import Config
from lisa_dist.distributed import Runtime
from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.models import ModelParts, ModelSource, find_parts
from lisa_dist.optim.shard import ShardInfo


class Engine(ABC):
    name: str

    def __init__(self, config: Config, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.model: nn.Module | None = None
        self.parts: ModelParts | None = None

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
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return parts

    @abstractmethod
    def local_shard(self, param: nn.Parameter) -> torch.Tensor:
        """This rank's slice of `param`, sharing storage with it."""

    @abstractmethod
    def local_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        """This rank's slice of `param`'s reduced gradient, or None if it has none."""

    @abstractmethod
    def shard_info(self, param: nn.Parameter) -> ShardInfo:
        """Where this rank's shard sits in `param`, and how to sum small tensors over its ranks."""

    @abstractmethod
    def register_grad_hook(self, param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> RemovableHandle:
        """Call `hook(param)` as soon as this rank's reduced gradient shard of `param` is ready."""

    def release_grad(self, param: nn.Parameter) -> None:
        """Drop this rank's gradient of `param` (after its update, or when a step is skipped)."""
        param.grad = None

    def resident_tensors(self) -> list[torch.Tensor]:
        """Long-lived tensors this rank holds for the model (for CPU storage accounting)."""
        return list(self.model.parameters())

    @classmethod
    def check_config(cls, config: Config, world_size: int) -> None:
        """Engine-specific configuration checks, run before any process group exists."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @abstractmethod
    def checkpoint_state(self, optim_state: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """{"model": ..., "optim": ...} of DTensors sharing storage with this rank's shards, so that
        torch.distributed.checkpoint saves them and loads into them in place (and reshards)."""

    @classmethod
    def checkpoint_shapes(cls, skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
        """Shape of each model tensor as `checkpoint_state` stores it, for a single-process export."""
        return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    def save(self, directory: Path, optim_state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write model shards and the optimizer's local state as a resharding-capable checkpoint."""
        dcp.save(self.checkpoint_state(optim_state), checkpoint_id=str(directory))

    def load(self, directory: Path, optim_state: dict[str, dict[str, torch.Tensor]], written_by: str) -> None:
        """Fill the model shards and `optim_state` (local tensors allocated by the caller) in place.

        DCP reshards a checkpoint in this engine's layout to any world size; another engine's layout is
        read tensor by tensor and sliced (`_load_other_layout`)."""
        if written_by == self.name:
            state = self.checkpoint_state(optim_state)
            dcp.load(state, checkpoint_id=str(directory))
            # DCP loads in place into DTensors; plain tensors (replicated scalars) are replaced in the dict.
            for name, entries in state["optim"].items():
                for key, value in entries.items():
                    if not isinstance(value, DTensor):
                        optim_state[name][key].copy_(value)
        else:
            self._load_other_layout(directory, optim_state)
        self._after_load()

    def _after_load(self) -> None:
        """Drop anything derived from the shards before they were loaded."""

    @torch.no_grad()
    def _load_other_layout(self, directory: Path, optim_state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Another engine stores tensors in its own shapes (ZeRO-3 flat, FSDP2 as the parameter), which DCP
        cannot map onto ours. Every layout is a row-major flat range per rank, so read one parameter's tensors
        whole (host memory for one parameter at a time) and keep this rank's range of each."""
        stored = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        for name, param in self.model.named_parameters():
            info = self.shard_info(param)
            targets = {f"model.{name}": self.local_shard(param)}
            targets |= {f"optim.{name}.{key}": t for key, t in optim_state.get(name, {}).items()}
            missing = [key for key in targets if key not in stored]
            if missing:
                raise CheckpointError(f"{directory} holds no {missing[0]}; it was not written for this model "
                                      "and method")
            whole = {key: torch.empty(stored[key].size, dtype=stored[key].properties.dtype) for key in targets}
            dcp.load(whole, checkpoint_id=str(directory), no_dist=True)
            for key, target in targets.items():
                flat = whole[key].reshape(-1)
                if target.numel() == info.numel and flat.numel() == info.global_numel:
                    target.copy_(flat[info.flat_start:info.flat_start + info.numel].view_as(target))
                elif target.numel() == flat.numel():
                    target.copy_(flat.view_as(target))
                else:
                    raise CheckpointError(f"{directory}: {key} holds {flat.numel()} values where this run's "
                                          f"shard needs {target.numel()} of {info.global_numel}")

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Unsharded CPU tensors on rank 0 (None elsewhere), for exporting an HF directory."""

    def reset_peak_memory(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.runtime.device)

    def peak_memory_bytes(self) -> int | None:
        """The allocator's peak since the last reset on GPU; None where the trainer must track storages."""
        if self.runtime.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.runtime.device)
        return None


def engine_class(name: str) -> type[Engine]:
    """Imported on demand: a FSDP2 run never imports DeepSpeed."""
    if name == "fsdp2":
        from lisa_dist.engines.fsdp2 import FSDP2Engine

        return FSDP2Engine
    if name == "zero3":
        from lisa_dist.engines.zero3 import Zero3Engine

        return Zero3Engine
    raise ConfigError(f"engine.name must be one of 'fsdp2', 'zero3', got {name!r}")


def create_engine(config: Config, runtime: Runtime) -> Engine:
    return engine_class(config.engine.name)(config, runtime)


def trainable_named_parameters(model: nn.Module) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
