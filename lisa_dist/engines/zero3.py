"""DeepSpeed ZeRO-3 partitioning with lisa_dist owning gradients and the optimizer.

DeepSpeed partitions every parameter into flat per-rank slices (`param.ds_tensor`) and gathers and
releases them around each module's forward and backward (its stage-3 parameter coordinator, driven by
`DeepSpeedZeRoOffload` without `deepspeed.initialize`). No DeepSpeed optimizer exists: its trainable set
would be fixed at initialize (DeepSpeed issue 5639). Instead a post-accumulate-grad hook on each
parameter reduce-scatters the full gradient into this rank's partition in fp32 and frees it, then calls
the hooks lisa_dist registered (fused updates, accumulation), exactly like FSDP2's post-reduce hooks.
Frozen parameters compute no gradient, so their hooks never fire and nothing is communicated for them.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils.hooks import RemovableHandle

from lisa_dist._compat import init_deepspeed_distributed, no_init_weights, set_attn_implementation, zero3_coordinator
from lisa_dist.config import Config
from lisa_dist.engines.base import Engine
from lisa_dist.engines.deepspeed_config import load_deepspeed_config
from lisa_dist.env import export_rank_variables
from lisa_dist.models import ModelParts, ModelSource, build_meta_model
from lisa_dist.models.build import DTYPES, open_weights
from lisa_dist.models.weights import random_init
from lisa_dist.optim.shard import ShardInfo


class Zero3Engine(Engine):
    name = "zero3"
    saves_parameters_by_reference = True  # DeepSpeed's free_param replaces param.data

    @classmethod
    def check_config(cls, config: Config, world_size: int) -> None:
        load_deepspeed_config(config, world_size)

    def _start_deepspeed(self) -> None:
        self.ds_config = load_deepspeed_config(self.config, self.runtime.world_size)
        export_rank_variables(self.runtime.env)  # zero.Init reads LOCAL_RANK, also in a plain process
        # DeepSpeed adopts the process group lisa_dist started (its own world size must be right before
        # it validates the batch sizes in the config).
        init_deepspeed_distributed()

    def build(self, source: ModelSource) -> tuple[nn.Module, ModelParts]:
        c = self.config
        self._start_deepspeed()
        hf_config = source.hf_config.__class__.from_dict(source.hf_config.to_dict())
        set_attn_implementation(hf_config, c.model.attn_implementation)
        # Built before zero.Init, and not only for its buffers: the model's modules (transformers.modeling_utils,
        # which imports torch._dynamo) must be imported outside zero.Init, whose patched tensor constructors
        # break dynamo's registration of its polyfills (TypeError: Signature mismatch ... new_tensor).
        reference = build_meta_model(source.hf_config, DTYPES[c.train.dtype], c.model.attn_implementation)
        # Partitioned as each module is built, so no rank ever holds the whole model; the weights are
        # written into the partitions afterwards, so transformers' own initialization is skipped.
        # The dtype comes from the config's bf16/fp16 blocks (filled from train.dtype): Init's own `dtype`
        # argument is ignored on accelerators without fp16 support (it falls back to bf16).
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config), no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
            if getattr(hf_config, "tie_word_embeddings", False):
                model.tie_weights()  # from_config leaves the head its own parameter; the checkpoint stores one
        self._restore_buffers(model, reference)
        with torch.no_grad():
            self._materialize(model, source, reference)
        return self._install(model)

    def adopt(self, model: nn.Module) -> tuple[nn.Module, ModelParts]:
        self._start_deepspeed()
        model.to(self.runtime.device)
        # Partitions the existing parameters in place, as if the model had been built inside zero.Init.
        deepspeed.zero.Init(module=model, config_dict_or_path=self.ds_config)
        return self._install(model)

    def _install(self, model: nn.Module) -> tuple[nn.Module, ModelParts]:
        """DeepSpeed's gather/release coordinator, and lisa_dist's reduce-scatter hook on every parameter."""
        parts = self._find_parts(model)
        self.coordinator = zero3_coordinator(model, self.ds_config)
        self.world_mesh()  # partitions are saved as DTensor shards over it
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        self._user_hooks: dict[nn.Parameter, dict[int, Callable[[nn.Parameter], None]]] = defaultdict(OrderedDict)
        self._handles = [p.register_post_accumulate_grad_hook(self._reduce_scatter) for p in model.parameters()]
        self.model, self.parts = model, parts
        return model, parts

    def _restore_buffers(self, model: nn.Module, reference: nn.Module) -> None:
        """zero.Init casts buffers to the training dtype; rotary tables must stay as the model builds them."""
        for name, buffer in reference.named_buffers():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._buffers[attr] = buffer.to(self.runtime.device)

    def _range(self, param: nn.Parameter) -> tuple[int, int]:
        """(flat start, valid elements) of this rank's partition; the tail of the last one is padding."""
        rank = dist.get_rank(group=param.ds_process_group)
        size = param.ds_tensor.ds_numel
        start = rank * size
        return start, max(0, min(size, param.ds_numel - start))

    def _materialize(self, model: nn.Module, source: ModelSource, reference: nn.Module) -> None:
        reader = open_weights(source, reference)
        std = float(getattr(source.hf_config, "initializer_range", 0.02))
        for name, param in model.named_parameters():
            shape = tuple(param.ds_shape)
            start, count = self._range(param)
            param.ds_tensor.zero_()  # DeepSpeed leaves the padding uninitialized
            if reader is not None:
                reader.check(name, list(shape))
            if count == 0:
                continue
            cols = max(1, param.ds_numel // shape[0]) if shape else 1
            first, last = start // cols, -(-(start + count) // cols)
            if reader is not None:
                rows = reader.read_rows(name, first, last).reshape(-1)
            else:
                rows = random_init(name, torch.Size(shape), std, self.config.seed).reshape(-1)[first * cols:last * cols]
            offset = start - first * cols
            param.ds_tensor[:count].copy_(rows[offset:offset + count])
        if reader is not None:
            reader.close()

    @torch.no_grad()
    def _reduce_scatter(self, param: nn.Parameter) -> None:
        group = param.ds_process_group
        world = dist.get_world_size(group=group)
        size = param.ds_tensor.ds_numel
        reduce_dtype = torch.float32 if self.config.train.reduce_dtype == "fp32" else param.grad.dtype
        grad = param.grad.reshape(-1).to(reduce_dtype)
        padding = size * world - param.ds_numel
        # Without padding and in the gradient's dtype this is the gradient itself, not a second full copy.
        flat = F.pad(grad, (0, padding)) if padding else grad
        del grad
        param.grad = None
        part = flat.new_empty(size)
        dist.reduce_scatter_single(part, flat, group=group)
        del flat
        _, count = self._range(param)
        part = part[:count].float().div_(world)
        previous = self._grads.get(param)
        self._grads[param] = part if previous is None else previous.add_(part)
        for hook in list(self._user_hooks[param].values()):
            hook(param)

    def local_shard(self, param: nn.Parameter) -> torch.Tensor:
        return param.ds_tensor[: self._range(param)[1]]

    def local_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        return self._grads.get(param)

    def release_grad(self, param: nn.Parameter) -> None:
        self._grads.pop(param, None)
        param.grad = None

    def shard_info(self, param: nn.Parameter) -> ShardInfo:
        start, count = self._range(param)
        group = param.ds_process_group
        return ShardInfo(global_shape=tuple(param.ds_shape), flat_start=start, numel=count,
                         reduce_sum=lambda t: dist.all_reduce(t, group=group))

    def register_grad_hook(self, param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> RemovableHandle:
        handle = RemovableHandle(self._user_hooks[param])
        self._user_hooks[param][handle.id] = hook
        return handle

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        # Parameters below DeepSpeed's persistence threshold stay gathered; release every gathered copy so
        # the next forward gathers the partitions lisa_dist updated.
        self.coordinator.release_backward_leftovers()
        self.coordinator.partition_all_parameters()

    def after_forward_only(self) -> None:
        self.coordinator.partition_all_parameters()

    def resident_tensors(self) -> list[torch.Tensor]:
        return [p.ds_tensor for p in self.model.parameters()] + list(self._grads.values())

    def _flat_global(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        """A partition as a DTensor shard of the flattened parameter: DeepSpeed's partitions are
        torch.chunk pieces of it, so DCP can reshard them to another world size."""
        if local.dim() != 1 or local.numel() != self._range(param)[1]:
            return local
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=(param.ds_numel,),
                                  stride=(1,))

    def checkpoint_state(self, optim_state: dict[str, dict[str, torch.Tensor]]) -> dict:
        params = dict(self.model.named_parameters())
        model = {name: self._flat_global(p, self.local_shard(p)) for name, p in params.items()}
        optim = {name: {key: self._flat_global(params[name], t) for key, t in state.items()}
                 for name, state in optim_state.items()}
        return {"model": model, "optim": optim}

    @classmethod
    def checkpoint_shapes(cls, skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
        return {name: (p.numel(),) for name, p in skeleton.named_parameters()}

    def after_load(self) -> None:
        self.coordinator.partition_all_parameters()  # no gathered copy may predate the loaded partitions

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        out = {}
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.runtime.is_main:
                    out[name] = param.detach().to("cpu", copy=True)
        return out if self.runtime.is_main else None
