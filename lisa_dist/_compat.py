"""The private parts of torch, DeepSpeed and transformers lisa_dist relies on, in one place.

Each entry says why no public API serves. `tests/unit/test_compat.py` imports and exercises every one
against the locked versions, so an upgrade that moves or changes one fails there, naming the symbol,
before any training code does.
"""

from __future__ import annotations

import importlib
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True, slots=True)
class Private:
    symbol: str
    """`package.module:attribute.path`."""
    reason: str
    export: str | None = None
    """The name the package imports it by from this module, if it does."""


PRIVATE = [
    Private("torch.distributed.tensor._utils:compute_local_shape_and_global_offset",
            "DTensor exposes no public shard offset; FSDP2 shards are read from checkpoints by their row range",
            export="compute_local_shape_and_global_offset"),
    Private("torch.distributed.fsdp:FSDPModule._get_fsdp_state",
            "FSDP2 fixes each unit's reduce dtype at lazy init; lisa_dist must run it while every layer is trainable"),
    Private("torch._subclasses.fake_tensor:FakeTensorMode", "`estimate` runs the real step on fake tensors",
            export="FakeTensorMode"),
    Private("torch._subclasses.fake_tensor:is_fake", "values of fake tensors cannot be read", export="is_fake"),
    Private("torch._subclasses.fake_tensor:unset_fake_temporarily",
            "the data order and layer schedule stay real inside `estimate`'s fake mode",
            export="unset_fake_temporarily"),
    Private("torch.testing._internal.distributed.fake_pg:FakeStore", "`estimate`'s process group of any world size"),
    Private("torch.distributed._tools.fsdp2_mem_tracker:FSDPMemTracker",
            "attributes rank 0's live storages to FSDP2 categories at the peak"),
    Private("torch.distributed._tools.fsdp2_mem_tracker:_FSDPRefType", "the tracker's category names",
            export="FSDP_CATEGORY"),
    Private("torch.distributed._tools.mem_tracker:_TOTAL_KEY", "the tracker's total, for the peak-only update"),
    Private("torch.distributed._tools.mem_tracker:MemTracker._update_peak_stats",
            "replaced by a device-wide-only update (the per-module walk was most of a 70B estimate's time)"),
    Private("torch.distributed._tools.mem_tracker:MemTracker._update_and_maybe_create_winfos",
            "files optimizer state created outside the tracked modules as such"),
    Private("torch.distributed._tools.mem_tracker:MemTracker._update_snap",
            "charges the storages FSDP2's parameter offload keeps in host memory to the host under `estimate`"),
    Private("torch.distributed._tools.mem_tracker:_UpdateType", "the kinds of snapshot update"),
    Private("torch.distributed.fsdp._fully_shard._fsdp_state:FSDPState",
            "`estimate` reads each unit's `_fsdp_param_group` to size the shards FSDP2's parameter offload "
            "copies to the device"),
    Private("torch.distributed.fsdp._fully_shard._fsdp_param:FSDPParam",
            "`estimate` reads `padded_sharded_param_size` and `param_dtype`: the bytes of a unit's copied-in shards"),
    Private("torch.utils._python_dispatch:TorchDispatchMode", "CPU storage accounting sees every op's outputs",
            export="TorchDispatchMode"),
    Private("torch.utils._pytree:tree_flatten", "the tensors among an op's outputs", export="tree_flatten"),
    Private("deepspeed.runtime.zero.parameter_offload:DeepSpeedZeRoOffload",
            "ZeRO-3's gather/release coordinator without deepspeed.initialize, whose optimizer would fix the "
            "trainable set at start (DeepSpeed issue 5639)"),
    Private("deepspeed.runtime.zero.parameter_offload:DeepSpeedZeRoOffload.release_backward_leftovers",
            "frees parameters below the persistence threshold that backward left gathered"),
    Private("deepspeed.runtime.zero.parameter_offload:DeepSpeedZeRoOffload.partition_all_parameters",
            "no gathered copy may outlive an update of its partition"),
    Private("deepspeed.comm.torch:build_shm_op",
            "DeepSpeed's CPU backend compiles a shared-memory all-reduce for inference tensor parallelism when "
            "its process group starts (a minute, and a C++ compiler); ZeRO-3 training never calls it"),
    Private("transformers.initialization:no_init_weights",
            "ZeRO-3 builds the model partitioned and writes the weights itself, so transformers' init is skipped",
            export="no_init_weights"),
    Private("transformers.conversion_mapping:get_model_conversion_mapping",
            "the checkpoint-to-module key renames from_pretrained applies, for reading each rank's rows",
            export="get_model_conversion_mapping"),
    Private("transformers.core_model_loading:rename_source_key", "applies one of those renames",
            export="rename_source_key"),
    Private("transformers.core_model_loading:WeightRenaming", "a rename rule (rows can be read through it)",
            export="WeightRenaming"),
    Private("transformers.core_model_loading:WeightConverter",
            "a conversion rule: expert stacking is read expert by expert, any other is refused",
            export="WeightConverter"),
    Private("transformers.core_model_loading:MergeModulelist", "stacks one stored tensor per expert",
            export="MergeModulelist"),
    Private("transformers.core_model_loading:Concatenate", "joins gate and up projections within each expert",
            export="Concatenate"),
    Private("transformers:PretrainedConfig._attn_implementation",
            "the attention kernel of a model built from a config (from_config takes no such argument for "
            "every model class)"),
    Private("transformers:PretrainedConfig._experts_implementation",
            "how a mixture-of-experts model built from a config computes its experts"),
    Private("transformers:PreTrainedModel._can_set_experts_implementation",
            "whether a model's experts implementation can be chosen (transformers ignores the choice otherwise)"),
    Private("transformers:Trainer._prepare_for_training",
            "LisaDistTrainer keeps accelerate from wrapping a model lisa_dist already sharded"),
    Private("transformers:Trainer._clip_grad_norm", "clipping is the core's (the Trainer would see no gradients)"),
    Private("transformers:Trainer._get_grad_norm", "the grad norm the Trainer logs is the core's"),
    Private("transformers:Trainer._load_from_checkpoint", "resume loads lisa_dist's shards, not a state dict"),
    Private("transformers:Trainer._save_optimizer_and_scheduler", "checkpoint-N/ also holds lisa_dist's state"),
    Private("transformers:Trainer._load_optimizer_and_scheduler", "the scheduler and learning rate of a resume"),
]


# torch 2.13 renamed the flat collectives (`reduce_scatter_tensor` -> `reduce_scatter_single`, the old names
# deprecated); FSDP2 calls whichever its torch has, by attribute at call time, so tests that count its
# collectives wrap the attribute named here.
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
RECOMPUTES_GROUPED_UNITS = TORCH_VERSION >= (2, 13)
"""Whether FSDP2 gathers a grouped unit's parameters (`fully_shard([final norm, head])`) when backward recomputes
one of its modules alone, as `train.loss_chunk_tokens` recomputes the head per chunk: torch 2.11 hands the
head its sharded weight there (checked on 2.11 and 2.13; 2.12 untested, so refused too)."""


def reduce_scatter(output: torch.Tensor, flat: torch.Tensor, group: Any) -> None:
    """Sum `flat` over `group` and keep this rank's slice in `output` (torch.distributed's flat reduce-scatter)."""
    getattr(dist, REDUCE_SCATTER)(output, flat, group=group)


def resolve(symbol: str) -> Any:
    """The object `symbol` names; an ImportError naming it and the installed version if it is gone."""
    module_name, _, path = symbol.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for name in path.split("."):
            target = getattr(target, name)
    except (ImportError, AttributeError) as e:
        package = module_name.split(".")[0]
        version = getattr(importlib.import_module(package), "__version__", "?")
        raise ImportError(f"lisa_dist needs {symbol}, which {package} {version} does not have ({e}); "
                          "install the versions of requirements/lock.txt") from None
    return target


# What the package imports from here (`Private.export`), resolved on first use: `lisa-dist report` or `plan`
# never touches the FSDP2 memory tracker or transformers' loading internals.
_EXPORTS = {p.export: p.symbol for p in PRIVATE if p.export}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = resolve(_EXPORTS[name])
    globals()[name] = value
    return value


def lazy_init_fsdp(model: nn.Module) -> None:
    """Run FSDP2's lazy initialization of `model` (a `fully_shard`ed root) now."""
    model._get_fsdp_state()._lazy_init()


def fsdp_unit_params(module: nn.Module) -> list[Any]:
    """FSDP2's records (`FSDPParam`) of the parameters a `fully_shard`ed module's own unit holds; [] for any
    other module."""
    from torch.distributed.fsdp import FSDPModule

    group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
    return list(group.fsdp_params) if group is not None else []


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of each decoder layer. transformers 5.24 renamed
    `gradient_checkpointing_enable(gradient_checkpointing_kwargs=)` to `activation_checkpointing_enable(
    activation_checkpointing_kwargs=)`, deprecating the old name; each version gets its own."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def loss_is_scaled_for_accumulation(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether a Trainer's `compute_loss` already divides by the accumulation steps, as `Trainer.training_step`
    decides it. transformers 5.24 lets a Trainer declare it (`loss_is_scaled_for_ga`, None: undeclared); 5.17
    has only the rule, which both apply when nothing is declared."""
    declared = getattr(trainer, "loss_is_scaled_for_ga", None)
    if declared is not None:
        return declared
    return ((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or trainer.compute_loss_func is not None)


def set_attn_implementation(hf_config: Any, name: str) -> None:
    hf_config._attn_implementation = name


def set_experts_implementation(hf_config: Any, name: str) -> None:
    hf_config._experts_implementation = name


def can_set_experts_implementation(model: nn.Module) -> bool:
    return bool(type(model)._can_set_experts_implementation())


def zero3_coordinator(model: nn.Module, ds_config: dict[str, Any]) -> Any:
    """DeepSpeed's ZeRO-3 gather/release coordinator for `model` (already partitioned by zero.Init)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    coordinator = resolve("deepspeed.runtime.zero.parameter_offload:DeepSpeedZeRoOffload")
    zero = DeepSpeedConfig(ds_config).zero_config
    return coordinator(
        module=model, timers=None, ds_config=ds_config, overlap_comm=zero.overlap_comm,
        prefetch_bucket_size=zero.prefetch_bucket_size, max_reuse_distance=zero.max_reuse_distance,
        max_live_parameters=zero.max_live_parameters, param_persistence_threshold=zero.param_persistence_threshold,
        model_persistence_threshold=zero.model_persistence_threshold, dp_process_group=None,
        offload_param_config=zero.offload_param, mpu=None)


def init_deepspeed_distributed() -> None:
    """`deepspeed.init_distributed` on the process group lisa_dist started, without building the
    shared-memory inference all-reduce of DeepSpeed's CPU backend (`deepspeed.comm.torch.build_shm_op`): a
    JIT C++ compile of about a minute on first use, needing a compiler, for a kernel only tensor-parallel
    inference calls. Without it DeepSpeed's own fallback, the process group's all_reduce, serves that call."""
    import deepspeed
    import torch.distributed as dist

    module = importlib.import_module("deepspeed.comm.torch")
    resolve("deepspeed.comm.torch:build_shm_op")
    original = module.build_shm_op
    module.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    finally:
        module.build_shm_op = original


def fake_process_group(world_size: int) -> None:
    """A process group of `world_size` ranks in which this process is rank 0 and no collective moves data."""
    import torch.distributed as dist

    dist.init_process_group("fake", store=resolve("torch.testing._internal.distributed.fake_pg:FakeStore")(),
                            rank=0, world_size=world_size)


def peak_tracker(model: nn.Module, placement: Any = None) -> Any:
    """torch's FSDP2 memory tracker keeping only the device-wide peak. Its own update also records a peak
    per module, walking every tracked module after each op: at 70B that walk was 71 % of `estimate`'s
    time, for per-module figures it never reads. The device-wide peak is computed as there.

    `placement` (`lisa_dist.sizing.estimate.HostOffload`) says on which device each storage counts: its
    `home(device)` is called once, when a storage is first seen on `device`, and `counted_on(category,
    home)` whenever the storage is filed under a category (a member of `FSDP_CATEGORY`); a storage refiled
    across devices leaves the old device's total and joins the new one's."""
    tracker_class = resolve("torch.distributed._tools.fsdp2_mem_tracker:FSDPMemTracker")
    total = resolve("torch.distributed._tools.mem_tracker:_TOTAL_KEY")
    update = resolve("torch.distributed._tools.mem_tracker:_UpdateType")

    class PeakTracker(tracker_class):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[total]:
                    self._peak_mem[device] = snapshot[total]
                    self._peak_mem_snap[device] = deepcopy(snapshot)

        def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: int | None = None,
                         old_reftype: Any = None) -> None:
            if placement is None:
                return super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
            home = winfo.__dict__.setdefault("home_device", placement.home(winfo.device))

            def device_of(reftype: Any) -> torch.device:
                return placement.counted_on(reftype, home)

            if u_type == update.REF and device_of(old_reftype) != device_of(winfo.reftype):
                new = winfo.reftype
                winfo.reftype, winfo.device = old_reftype, device_of(old_reftype)
                super()._update_snap(update.DEL, winfo)
                winfo.reftype, winfo.device = new, device_of(new)
                return super()._update_snap(update.ADD, winfo)
            winfo.device = device_of(winfo.reftype)
            return super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)

        def track_optimizer_state(self, tensor: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(tensor, category.OPT)

    category = resolve(_EXPORTS["FSDP_CATEGORY"])
    return PeakTracker(model)
