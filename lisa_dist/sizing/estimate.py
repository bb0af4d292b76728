"""`lisa-dist estimate`: the real FSDP2 training step at full scale on fake tensors and a fake process group.

No weights are read and no memory is allocated: FakeTensorMode carries shapes and dtypes through the
project's own model wrapping, sampler, optimizer or LOMO hooks, activation checkpointing and loss, and
torch's FSDP2 memory tracker attributes rank 0's live storages to categories at the peak.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lisa_dist._compat import FSDP_CATEGORY, FakeTensorMode, fake_process_group, fsdp_unit_params, peak_tracker
from lisa_dist.config import Config
from lisa_dist.core import TrainingCore
from lisa_dist.distributed import Runtime
from lisa_dist.env import LaunchEnv
from lisa_dist.errors import ConfigError
from lisa_dist.models.moe import routed_experts
from lisa_dist.sizing.memory import GIB, RESERVE_GIB, print_categories
from lisa_dist.sizing.shapes import ShapesOnly
from lisa_dist.train import Trainer, prepare


C = FSDP_CATEGORY
CATEGORIES = {
    C.SHARDED_PARAM: "sharded_params", C.UNSHARDED_PARAM: "unsharded_params", C.SHARDED_GRAD: "sharded_grads",
    C.UNSHARDED_GRAD: "unsharded_grads", C.ACT: "activations", C.TEMP: "temporaries",
    C.ALL_GATHER: "all_gather_buffers", C.REDUCE_SCATTER: "reduce_scatter_buffers", C.OPT: "optimizer_state",
    C.BUFFER: "buffers", C.INP: "inputs",
}


NOT_MODELLED = {
    "output_dir": "estimate writes nothing", "overwrite": "estimate writes nothing",
    "save_every": "checkpoints are written between steps, outside the step's peak",
    "save_total_limit": "checkpoints are not modelled", "resume": "a resumed step is the same step",
    "progress_bar": "no bar is drawn", "max_steps": "the estimate runs the steps of one interval switch",
    "engine.timeout_s": "no collective waits under the fake process group",
    "train.max_consecutive_skips": "fake values are never non-finite",
    "eval_every": "evaluation runs forwards without gradients between steps, within a step's peak",
    "eval_max_batches": "evaluation runs forwards without gradients between steps, within a step's peak",
    "logging.wandb_project": "trackers run on rank 0 outside the step", "logging.log_every": "no line is printed",
    "save_errors": "checkpoints are written between steps, outside the step's peak",
    "async_save": "the background checkpoint's copy is in host memory, not the device's",
    "preempt.signals": "a preemption signal ends the run between steps",
    "preempt.exit_code": "a preemption signal ends the run between steps",
}
"""Keys that do not change a step's peak; `estimate` reports which of them a config sets."""


def _schedule(config: Config) -> list[int]:
    """The first step, which creates the optimizer state; the second, which starts with it (not for LOMO and
    plain SGD: they keep nothing between steps, and the second step peaks exactly as the first); with LISA
    the first step of the next interval, so a switch is included."""
    o = config.optim
    stateless = o.name == "lomo" or (o.name == "sgd" and o.momentum == 0)
    first = [0] if stateless else [0, 1]
    return first if config.method == "full" else [*first, config.lisa.interval]


def run_estimate(config: Config, world_size: int, gpu_mem_gib: float,
                 reserve_gib: float = RESERVE_GIB) -> dict[str, Any]:
    if config.engine.name != "fsdp2":
        raise ConfigError("lisa-dist estimate runs the FSDP2 step; use lisa-dist plan for engine.name=zero3")
    source, sequences, _ = prepare(config, world_size, check_output=False, read_weights=False, fill_batch=True)
    if routed_experts(source.hf_config) and config.train.dtype != "bf16":
        raise ConfigError(f"lisa-dist estimate of a mixture-of-experts model needs train.dtype=bf16 (this config has "
                          f"{config.train.dtype}): its experts run through torch's grouped matrix product, whose "
                          "shapes-only form takes bf16 alone; use lisa-dist plan for other dtypes")
    source = dataclasses.replace(source, weights_dir=None)
    fake_process_group(world_size)
    try:
        env = LaunchEnv(rank=0, world_size=world_size, local_rank=0, local_world_size=min(8, world_size),
                        launcher="estimate")
        # The fake CPU device stands for the GPU; host memory (offloaded state and activations) is the meta
        # device, so the tracker counts it apart.
        runtime = Runtime(env=env, device=torch.device("cpu"), host_device=torch.device("meta"))
        mesh = init_device_mesh("cpu", (world_size,))  # a DeviceMesh cannot be built on fake tensors
        with FakeTensorMode(allow_non_fake_inputs=True):
            core = TrainingCore.build(config, runtime, source, mesh=mesh, values=ShapesOnly())
            trainer = Trainer(config, runtime, source, sequences, core=core)
            peak, host_peak = _tracked_peak(trainer, _schedule(config), config.engine.offload_params)
            staging = _host_to_device_staging(core.model) if config.engine.offload_params else 0
    finally:
        dist.destroy_process_group()
    categories = {CATEGORIES.get(k, str(k)): v / GIB for k, v in peak.items() if k != "Total"}
    if staging:
        categories["host_to_device_copies"] = staging / GIB
    total = (peak["Total"] + staging) / GIB
    return {"peak_gib": total, "fits": total <= gpu_mem_gib - reserve_gib, "world_size": world_size,
            "gpu_mem_gib": gpu_mem_gib, "reserve_gib": reserve_gib, "budget_gib": gpu_mem_gib - reserve_gib,
            "host_offload_gib": host_peak / GIB, "categories": categories, "method": config.method,
            "optim": config.optim.name, "steps": _schedule(config), "not_modelled": _not_modelled(config)}


def _not_modelled(config: Config) -> dict[str, str]:
    """The keys of NOT_MODELLED this config sets to other than their defaults, with why they do not matter."""
    default = Config()
    out = {}
    for key, why in NOT_MODELLED.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        if value != getattr(getattr(default, section) if section else default, name):
            out[key] = why
    return out


# With FSDP2's parameter offload these live in host memory. The fake device stands for both the GPU and
# the host's processor, so the tracker files them, and what each shard's update allocates, on the host.
OFFLOADED = frozenset({C.SHARDED_PARAM, C.SHARDED_GRAD, C.OPT})


class HostOffload:
    """Where the tracker counts each storage with FSDP2's parameter offload: categories in OFFLOADED, and
    storages made inside `on_host()` (the optimizer's work where a shard lives), on `host`."""

    def __init__(self, host: torch.device) -> None:
        self.host = host
        self.depth = 0
        """How many `on_host()` blocks are open."""

    def home(self, device: torch.device) -> torch.device:
        return self.host if self.depth else device

    def counted_on(self, category: Any, home: torch.device) -> torch.device:
        return self.host if category in OFFLOADED else home

    @contextmanager
    def on_host(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


def _tracked_peak(trainer: Trainer, steps: list[int], offload_params: bool = False) -> tuple[dict[Any, int], int]:
    """Rank 0's device peak by category, and the peak bytes it keeps in host memory."""
    host = torch.device("meta")
    placement = HostOffload(host) if offload_params else None
    tracker = peak_tracker(trainer.core.model, placement)
    if placement is not None:  # a shard's state, accumulation and update are made where the shard is
        trainer.core.optimizer.on_shard_device = placement.on_host
    with tracker:
        for step in steps:
            trainer.core.switch(step)  # before the step: new optimizer state is then filed as such
            for state in trainer.core.optimizer_state().values():
                for tensor in state.values():
                    tracker.track_optimizer_state(tensor)
            trainer.train_step(step)
    snapshot = tracker.get_tracker_snapshot("peak")
    device_peak = snapshot.get(torch.device("cpu"), {"Total": 0})
    return device_peak, snapshot.get(host, {}).get("Total", 0)


def _host_to_device_staging(model: torch.nn.Module) -> int:
    """Bytes of the largest FSDP2 unit's local shards in the compute dtype. With parameter offload FSDP2
    copies them to the device before each all-gather, and the copies live until the all-gather's input
    is filled. Under `estimate` the copy is from the fake device to itself, which allocates nothing, so it
    is added here: at most one unit's copies exist at a time, and counting them at the peak is an upper
    bound (they are transient)."""
    return max((sum(p.padded_sharded_param_size.numel() * (p.param_dtype or p.sharded_param.dtype).itemsize
                    for p in fsdp_unit_params(module)) for module in model.modules()), default=0)


def print_estimate(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(f"{result['method']} + {result['optim']} on {result['world_size']} ranks: rank 0 peaks at "
          f"{result['peak_gib']:.2f} GiB; budget {result['budget_gib']:.2f} GiB "
          f"({result['gpu_mem_gib']} GiB card - {result['reserve_gib']} GiB reserve): "
          f"{'fits' if result['fits'] else 'does NOT fit'}")
    if result["not_modelled"]:
        print(f"  not modelled (no effect on a step's peak): {', '.join(result['not_modelled'])}")
    if result["host_offload_gib"]:
        print(f"  offloaded to host memory: {result['host_offload_gib']:.2f} GiB at its peak")
    print_categories(result["categories"])
