"""Per-step peak of a training run on CPU, and the live tensor storages at that peak by allocation site
(docs/zero3.md). Storage-accounted like `lisa-dist train`'s `peak_mem` on CPU; rank 0 prints.

Usage: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/peak_sites.py CONFIG.yaml
       [key=value ...]
       (PEAK_STEPS=3 steps are measured, PEAK_TOP=14 sites shown per step)
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
import weakref

import torch
import torch.distributed as dist

from lisa_dist.config import load_config
from lisa_dist.distributed import init_distributed
from lisa_dist.env import read_launch_env
from lisa_dist.sizing.memory import StorageTracker
from lisa_dist.train import Trainer, prepare

MIB = float(1 << 20)
KEEP = ("lisa_dist", "deepspeed", "transformers", "torch/distributed/fsdp")


def _site() -> str:
    """The innermost three frames of lisa_dist, DeepSpeed, transformers or FSDP2 that allocated."""
    frames = [f for f in traceback.extract_stack()[:-4] if any(k in f.filename for k in KEEP)]
    return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in frames[-3:][::-1]) or "?"


class SiteTracker(StorageTracker):
    """A StorageTracker that also remembers, at each new peak, the live storages' sizes and sites."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[int, tuple[int, str]] = {}
        self.at_peak: list[tuple[int, str]] = []
        self._label: str | None = None

    def track(self, tensors) -> None:
        self._label = "resident: shards, partitions, kept gradients, optimizer state"
        super().track(tensors)
        self._label = None

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self._sizes:
            return
        key = id(storage)
        site = self._label or (_site() if storage.nbytes() >= 1 << 16 else "(under 64 KiB)")
        self.sites[key] = (storage.nbytes(), site)
        super()._add(storage)
        weakref.finalize(storage, self.sites.pop, key, None)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        super()._resized(storage)
        if id(storage) in self.sites:
            self.sites[id(storage)] = (storage.nbytes(), self.sites[id(storage)][1])

    def _grow(self, delta: int) -> None:
        self.live += delta
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = list(self.sites.values())


def main(argv: list[str]) -> None:
    config = load_config(argv[0], argv[1:])
    env = read_launch_env()
    source, sequences, _ = prepare(config, env.world_size)
    trainer = Trainer(config, init_distributed(env, config.engine.timeout_s), source, sequences)
    for step in range(int(os.environ.get("PEAK_STEPS", 3))):
        trainer.tracker = SiteTracker()
        record = trainer._measured_step(step)
        if trainer.runtime.rank == 0:
            by_site: collections.Counter[str] = collections.Counter()
            for nbytes, site in trainer.tracker.at_peak:
                by_site[site] += nbytes
            print(f"step {step}: peak {trainer.tracker.peak / MIB:.1f} MiB on rank 0 "
                  f"(max over ranks {record['peak_mem_gib'] * 1024:.1f} MiB)")
            for site, nbytes in by_site.most_common(int(os.environ.get("PEAK_TOP", 14))):
                print(f"  {nbytes / MIB:8.1f} MiB  {site}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
