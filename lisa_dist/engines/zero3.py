"""DeepSpeed ZeRO-3 partitioning with lisa_dist owning gradients and the optimizer.

DeepSpeed partitions every parameter into flat per-rank slices (`param.ds_tensor`) and gathers and
releases them around each module's forward and backward (its stage-3 parameter coordinator, driven by
`DeepSpeedZeRoOffload` without `deepspeed.initialize`). No DeepSpeed optimizer exists: its trainable set
would be fixed at initialize (DeepSpeed issue 5639). Instead a post-accumulate-grad hook on each
parameter copies the full gradient into a bucket and frees it; a bucket (one unit's parameters, at most
`zero_optimization.reduce_bucket_size` elements or one parameter) is reduce-scattered into each rank's
partitions in fp32 in one collective, then the hooks lisa_dist registered run for its parameters (fused
updates, accumulation), exactly like FSDP2's post-reduce hooks. Frozen parameters compute no gradient, so their
hooks never fire and nothing is communicated for them.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable

import deepspeed
from deepspeed.utils import set_z3_leaf_module
import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils.hooks import RemovableHandle

from lisa_dist._compat import init_deepspeed_distributed, no_init_weights, reduce_scatter, zero3_coordinator
from lisa_dist.config import Config
from lisa_dist.engines.base import Engine
from lisa_dist.engines.deepspeed_config import load_deepspeed_config
from lisa_dist.env import export_rank_variables
from lisa_dist.models import ModelParts, ModelSource, build_meta_model
from lisa_dist.models.build import DTYPES, model_config, open_weights, persistent_buffers
from lisa_dist.models.moe import expert_modules
from lisa_dist.models.weights import random_init
from lisa_dist.optim.shard_info import ShardInfo


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
        m = c.model
        hf_config = model_config(source.hf_config, m.attn_implementation, m.experts_implementation)
        # Built before zero.Init, and not only for its buffers: the model's modules (transformers.modeling_utils,
        # which imports torch._dynamo) must be imported outside zero.Init, whose patched tensor constructors
        # break dynamo's registration of its polyfills (TypeError: Signature mismatch ... new_tensor).
        reference = build_meta_model(source.hf_config, DTYPES[c.train.dtype], m.attn_implementation,
                                     m.experts_implementation)
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
        # The experts are fetched whole when their module is called, their children not hooked: a loop over the
        # experts a rank's tokens reach (experts_implementation=eager) calls the activation module a different
        # number of times on each rank, and ZeRO-3 would prefetch by that order into mismatched collectives.
        for module in expert_modules(model):
            set_z3_leaf_module(module, True)
        self.coordinator = zero3_coordinator(model, self.ds_config)
        self.world_mesh()  # partitions are saved as DTensor shards over it
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        self._user_hooks: dict[nn.Parameter, dict[int, Callable[[nn.Parameter], None]]] = defaultdict(OrderedDict)
        self.model, self.parts = model, parts
        self._units = self.grad_units()
        self._unit_of = {id(p): u for u, unit in enumerate(self._units) for p in unit}
        self._bucket = _Bucket(self._bucket_cap(model))
        self._waiting: dict[int, set[int]] = {}
        """Per unit with gradients this backward: the trainable parameters whose gradients are still to come."""
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in model.parameters()]
        return model, parts

    def _bucket_cap(self, model: nn.Module) -> int:
        """`zero_optimization.reduce_bucket_size` elements as the user set it (a bucket still takes one
        parameter larger than that); by default (not set, or "auto") the largest decoder-layer parameter's:
        a layer's backward then holds no more gradient than its largest matrix already needed, alone."""
        size = self.ds_config["zero_optimization"].get("reduce_bucket_size")
        if size is not None:
            return size
        layer_params = [p for layer in self.parts.layers for p in layer.parameters()] or list(model.parameters())
        return max(p.ds_numel for p in layer_params)

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
            # A row: of dim 0, or of an expert's matrix (a cut expert is read only where the partition is).
            experts = len(shape) == 3
            cols = (shape[-1] if experts else max(1, param.ds_numel // shape[0])) if shape else 1
            first, last = start // cols, -(-(start + count) // cols)
            if reader is not None:
                read = reader.read_expert_rows if experts else reader.read_rows
                rows = read(name, first, last).reshape(-1)
            else:
                rows = random_init(name, torch.Size(shape), std, self.config.seed).reshape(-1)[first * cols:last * cols]
            offset = start - first * cols
            param.ds_tensor[:count].copy_(rows[offset:offset + count])
        if reader is not None:
            reader.read_buffers(model)
            reader.close()

    @torch.no_grad()
    def _on_grad(self, param: nn.Parameter) -> None:
        """Move the full gradient into the bucket and free it; reduce the bucket when the unit's last gradient
        is in, or before a gradient that would overfill it."""
        unit = self._unit_of[id(param)]
        if unit not in self._waiting:
            self._waiting[unit] = {id(p) for p in self._units[unit] if p.requires_grad}
        waiting = self._waiting[unit]
        waiting.discard(id(param))
        bucket = self._bucket
        size = param.ds_tensor.ds_numel
        if bucket.params and (bucket.unit != unit or not bucket.fits(size)):
            self._reduce_bucket()
        if not bucket.params:
            later = sum(p.ds_tensor.ds_numel for p in self._units[unit] if id(p) in waiting)
            reduce_dtype = torch.float32 if self.config.train.reduce_dtype == "fp32" else param.grad.dtype
            bucket.open(unit, dist.get_world_size(group=param.ds_process_group), size, later, reduce_dtype,
                        param.grad.device)
        bucket.add(param, param.grad.reshape(-1), size)
        param.grad = None
        if not waiting:
            del self._waiting[unit]
            self._reduce_bucket()

    def _reduce_bucket(self) -> None:
        bucket = self._bucket
        params, offsets = bucket.params, bucket.offsets
        world = bucket.buffer.shape[0]
        flat = bucket.take_input()
        out = flat.new_empty(flat.numel() // world)
        reduce_scatter(out, flat, params[0].ds_process_group)
        del flat
        out = out.float().div_(world)
        for param, offset in zip(params, offsets):
            part = out[offset:offset + self._range(param)[1]]
            previous = self._grads.get(param)
            self._grads[param] = part if previous is None else previous.add_(part)
        del out
        for param in params:
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
                         reduce_sum=self.group_sum(group))

    def register_grad_hook(self, param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> RemovableHandle:
        handle = RemovableHandle(self._user_hooks[param])
        self._user_hooks[param][handle.id] = hook
        return handle

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self._bucket.params:  # a unit with a trainable parameter that got no gradient
            self._reduce_bucket()
        self._waiting.clear()
        # Parameters below DeepSpeed's persistence threshold stay gathered; release every gathered copy so
        # the next forward gathers the partitions lisa_dist updated.
        self.coordinator.release_backward_leftovers()
        self.coordinator.partition_all_parameters()

    def after_forward_only(self) -> None:
        self.coordinator.partition_all_parameters()

    def resident_tensors(self) -> list[torch.Tensor]:
        return [p.ds_tensor for p in self.model.parameters()] + list(self._grads.values())

    def _flat_global(self, param: nn.Parameter | None, local: torch.Tensor) -> torch.Tensor:
        """A partition as a DTensor shard of the flattened parameter: DeepSpeed's partitions are
        torch.chunk pieces of it, so DCP can reshard them to another world size."""
        if param is None or local.dim() != 1 or local.numel() != self._range(param)[1]:
            return local
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=(param.ds_numel,),
                                  stride=(1,))

    def checkpoint_state(self, optim_state: dict[str, dict[str, torch.Tensor]]) -> dict:
        params = dict(self.model.named_parameters())
        model = {name: self._flat_global(p, self.local_shard(p)) for name, p in params.items()}
        model |= persistent_buffers(self.model)  # replicated: each rank holds them whole
        # An expert's part (lisa.unit=expert) is no parameter's partition: it is stored as this rank holds it.
        optim = {name: {key: self._flat_global(params.get(name), t) for key, t in state.items()}
                 for name, state in optim_state.items()}
        return {"model": model, "optim": optim}

    @classmethod
    def checkpoint_shapes(cls, skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
        buffers = {name: tuple(b.shape) for name, b in persistent_buffers(skeleton).items()}
        return {name: (p.numel(),) for name, p in skeleton.named_parameters()} | buffers

    def after_load(self) -> None:
        self.coordinator.partition_all_parameters()  # no gathered copy may predate the loaded partitions

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        out = {}
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.runtime.is_main:
                    out[name] = param.detach().to("cpu", copy=True)
        out |= {name: b.detach().to("cpu", copy=True) for name, b in persistent_buffers(self.model).items()}
        return out if self.runtime.is_main else None


class _Bucket:
    """Full gradients waiting for one reduce-scatter, laid out rank-major: row r holds, for each parameter
    in turn, the r-th partition's slice of its flat gradient (zeros past its end), so each rank's
    partitions come back side by side."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.params: list[nn.Parameter] = []
        self.offsets: list[int] = []
        self.unit = -1
        self.used = 0
        self.buffer = torch.empty(0)

    def open(self, unit: int, world: int, size: int, later: int, dtype: torch.dtype, device: torch.device) -> None:
        """Columns for the cap, or for what the unit still has to send when that is less (`later`, besides
        this parameter's `size`), and at least this parameter's partition."""
        cols = max(size, min(-(-self.cap // world), size + later))
        self.buffer = torch.empty(world, cols, dtype=dtype, device=device)
        self.unit = unit

    def fits(self, size: int) -> bool:
        return self.used + size <= self.buffer.shape[1]

    def add(self, param: nn.Parameter, grad: torch.Tensor, size: int) -> None:
        rows = self.buffer[:, self.used:self.used + size]
        full, rest = divmod(grad.numel(), size)
        rows[:full].copy_(grad[:full * size].view(full, size))
        if rest:
            rows[full, :rest].copy_(grad[full * size:])
            rows[full, rest:].zero_()
        rows[full + (rest > 0):].zero_()  # padding, and partitions past the parameter's end
        self.params.append(param)
        self.offsets.append(self.used)
        self.used += size

    def take_input(self) -> torch.Tensor:
        """The filled columns as one contiguous rank-major tensor (in place: row r moves to r * used), and the
        bucket emptied."""
        buffer, used = self.buffer, self.used
        flat = buffer.view(-1)
        if used < buffer.shape[1]:
            for r in range(1, buffer.shape[0]):
                flat[r * used:(r + 1) * used].copy_(buffer[r, :used].clone())  # the ranges may overlap
        self.params, self.offsets, self.used, self.buffer = [], [], 0, torch.empty(0)
        return flat[:buffer.shape[0] * used]
