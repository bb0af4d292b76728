"""PyTorch FSDP2 (`fully_shard`): one FSDP unit per decoder layer, the root holding embeddings, norm and head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from lisa_dist._compat import RECOMPUTES_GROUPED_UNITS, compute_local_shape_and_global_offset, lazy_init_fsdp
from lisa_dist.config import Config
from lisa_dist.engines.base import Engine, sharding_units
from lisa_dist.errors import ConfigError
from lisa_dist.models import ModelParts, ModelSource, build_meta_model
from lisa_dist.models.build import DTYPES, open_weights
from lisa_dist.models.weights import random_init
from lisa_dist.optim.shard_info import ShardInfo, local_shard_info


class FSDP2Engine(Engine):
    name = "fsdp2"

    @classmethod
    def check_config(cls, config: Config, world_size: int) -> None:
        if config.train.loss_chunk_tokens and not RECOMPUTES_GROUPED_UNITS:
            raise ConfigError(f"train.loss_chunk_tokens={config.train.loss_chunk_tokens} on engine.name=fsdp2 needs "
                              f"torch >= 2.13 (this is {torch.__version__}, whose FSDP2 does not gather the head "
                              "again when backward recomputes a chunk); set it to 0 or upgrade torch")

    def build(self, source: ModelSource) -> tuple[nn.Module, ModelParts]:
        c = self.config
        dtype = DTYPES[c.train.dtype]
        model = build_meta_model(source.hf_config, dtype, c.model.attn_implementation, c.model.experts_implementation)
        parts = self._shard(model)
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        # Offloaded shards live in host memory; FSDP2 copies each unit to the device for its compute.
        model.to_empty(device="cpu" if c.engine.offload_params else self.runtime.device)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
            if c.engine.offload_params:  # buffers (rotary tables) stay with the compute
                for module in model.modules():
                    module._buffers.update({n: b.to(self.runtime.device) for n, b in module._buffers.items()
                                            if b is not None})
            self._materialize(model, source)
        return self._finish(model, parts)

    def adopt(self, model: nn.Module) -> tuple[nn.Module, ModelParts]:
        # fully_shard moves each unit to the mesh's device as it shards it: one full unit at a time.
        return self._finish(model, self._shard(model))

    def _shard(self, model: nn.Module) -> ModelParts:
        c = self.config
        dtype = DTYPES[c.train.dtype]
        parts = self._find_parts(model)
        # By default gradients are reduce-scattered in fp32 so bf16 rounding does not compound across ranks.
        reduce_dtype = torch.float32 if c.train.reduce_dtype == "fp32" else dtype
        options = dict(mesh=self.world_mesh(), reshard_after_forward=c.engine.reshard_after_forward,
                       mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype),
                       offload_policy=self._offload_policy())
        for unit in sharding_units(parts, c.engine.split_layers):
            fully_shard(unit, **options)
        fully_shard(model, **options)
        if not c.engine.backward_prefetch:
            for layer in parts.layers:
                # A non-empty explicit list replaces FSDP2's default of prefetching the next layer; the
                # layer itself is already gathered when its backward starts, so this prefetches nothing.
                layer.set_modules_to_backward_prefetch([layer])
        return parts

    def _finish(self, model: nn.Module, parts: ModelParts) -> tuple[nn.Module, ModelParts]:
        # FSDP2 fixes each unit's reduce dtype at lazy init from the parameters trainable at that moment;
        # initialize with everything trainable, or layers that LISA activates later would reduce in bf16.
        model.requires_grad_(True)
        lazy_init_fsdp(model)
        self.model, self.parts = model, parts
        return model, parts

    def _offload_policy(self) -> OffloadPolicy:
        if not self.config.engine.offload_params:
            return OffloadPolicy()
        # Pinned memory needs an accelerator; on a CPU-only machine the shards are in host memory anyway.
        return CPUOffloadPolicy(pin_memory=self.runtime.device.type == "cuda")

    def _materialize(self, model: nn.Module, source: ModelSource) -> None:
        if not self.values.has_data:
            return
        reader = open_weights(source)
        std = float(getattr(source.hf_config, "initializer_range", 0.02))
        for name, param in model.named_parameters():
            local = self.local_shard(param)
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            start = offset[0] if offset else 0
            rows = shape[0] if shape else 1
            if reader is not None:
                reader.check(name, list(param.shape))
                if local.numel():
                    local.copy_(reader.read_rows(name, start, start + rows))
            else:
                full = random_init(name, param.shape, std, self.config.seed)
                if local.numel():
                    local.copy_(full[start:start + rows] if full.dim() else full)
        if reader is not None:
            reader.read_buffers(model)
            reader.close()

    def after_forward_only(self) -> None:
        # Without a backward, units that keep their parameters gathered after forward (the root, and all of
        # them with reshard_after_forward=false) would hold them until the next forward.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def local_shard(self, param: nn.Parameter) -> torch.Tensor:
        return param.to_local() if isinstance(param, DTensor) else param.data

    def local_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        grad = param.grad
        if grad is None:
            return None
        return grad.to_local() if isinstance(grad, DTensor) else grad

    def shard_info(self, param: nn.Parameter) -> ShardInfo:
        if not isinstance(param, DTensor):
            return local_shard_info(param)
        with self.values.real_tensors():  # offsets are plain integers
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        row_numel = param.numel() // param.shape[0] if param.dim() else 1
        group = param.device_mesh.get_group()
        return ShardInfo(global_shape=tuple(param.shape), flat_start=(offset[0] if offset else 0) * row_numel,
                         numel=self.local_shard(param).numel(), reduce_sum=self.group_sum(group))

    def register_grad_hook(self, param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> RemovableHandle:
        # FSDP2 runs post-accumulate-grad hooks on the sharded parameter right after its reduce-scatter
        # (autograd itself only ever sees the unsharded parameter).
        return param.register_post_accumulate_grad_hook(hook)

    def _as_global(self, param: nn.Parameter | None, local: torch.Tensor) -> torch.Tensor:
        if not isinstance(param, DTensor) or local.shape != self.local_shard(param).shape:
            return local
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def checkpoint_state(self, optim_state: dict[str, dict[str, torch.Tensor]]) -> dict:
        params = dict(self.model.named_parameters())
        # An expert's part (lisa.unit=expert) is no parameter's shard: it is stored as this rank holds it.
        optim = {name: {key: self._as_global(params.get(name), t) for key, t in state.items()}
                 for name, state in optim_state.items()}
        return {"model": self.model.state_dict(), "optim": optim}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return state if self.runtime.is_main else None
