"""Random draws as a function of the seed and where they are made (a step and a rank, a parameter): a resumed run
draws what the uninterrupted run drew, with no generator state saved in checkpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derived_seed(stream: str, seed: int, *where: object) -> int:
    """A 63-bit seed for `stream`'s draws at `where` (a step and a rank, a parameter's name, ...): the same on
    every machine; streams are independent of each other."""
    digest = hashlib.sha256("/".join(["lisa_dist", stream, str(seed), *map(str, where)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextmanager
def model_randomness(seed: int, step: int, rank: int, device: torch.device) -> Iterator[None]:
    """Inside: torch's global generators (the CPU's and `device`'s), which a model's dropout and router noise draw
    from, seeded for `step` on `rank`; after: as they were, so code around the step (a Trainer's sampler) sees
    no change. Each entry at a step draws the same masks, so a fused optimizer's two passes agree."""
    devices = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        value = derived_seed("model", seed, step, rank)
        torch.default_generator.manual_seed(value)
        for index in devices:
            module = torch.get_device_module(device.type)
            with module.device(index):
                module.manual_seed(value)
        yield
