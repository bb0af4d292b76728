"""Count, per optimizer step, the host reads and collectives of a training run, by whose code makes them.

A read of a tensor's value on the host (`.item()`, `float(t)`, `.tolist()` of a vector lisa_dist reduces)
makes a GPU wait for its stream; each is attributed to the innermost of lisa_dist, transformers and the engines
(FSDP2, DeepSpeed, lisa_dist/engines) on the stack. `tests/gloo/test_host_reads.py` holds lisa_dist's count.

Usage (one process, configs/tiny.yaml, steps that switch no layer and write nothing):
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.host_reads [KEY=VALUE ...]
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default"}
# Checked in this order on each frame: lisa_dist's ZeRO-3 engine reduce-scatters gradients as DeepSpeed would.
OWNERS = {"/lisa_dist/engines/": "engine", "/lisa_dist/": "lisa_dist", "/transformers/": "transformers",
          "/torch/distributed/fsdp/": "engine", "/deepspeed/": "engine"}
# Pass-throughs: a read or collective they make belongs to their caller.
PASS_THROUGH = ("/lisa_dist/values.py", "/lisa_dist/_compat.py", "/lisa_dist/distributed.py")


def owner() -> str:
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.endswith(PASS_THROUGH):
            continue
        for marker, name in OWNERS.items():
            if marker in frame.filename:
                return name
    return "other"


class Counter(TorchDispatchMode):
    """Scalar reads and c10d collectives dispatched inside, by owner; `active` also receives vector reads."""

    active: Counter | None = None

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __enter__(self) -> Counter:
        Counter.active = self
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        Counter.active = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = str(func)
        if name in READS:
            self.counts[f"{owner()} scalar read"] += 1
        elif name.startswith("c10d."):
            self.counts[f"{owner()} collective"] += 1
        return func(*args, **(kwargs or {}))


def count_vector_reads() -> None:
    """Count `lisa_dist.values.Values`' vector reads (`.tolist()` dispatches nothing) in the active Counter (a
    method an older lisa_dist lacks is skipped, so the counts of a commit before these can be compared)."""
    from lisa_dist import values

    for method in ("items", "sum_over_ranks"):  # every read goes through `items`; older versions also had the latter
        original = getattr(values.Values, method, None)
        if original is None:
            continue

        def counted(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if Counter.active is not None:
                Counter.active.counts[f"{owner()} vector read"] += 1
            return _original(self, *args, **kwargs)

        setattr(values.Values, method, counted)


def count_steps(trainer: Any, steps: int) -> list[dict[str, int]]:
    """Each of the first `steps` steps' counts."""
    out = []
    for step in range(steps):
        with Counter() as counter:
            trainer.train_step(step)
        out.append(dict(counter.counts))
    return out


def main() -> None:
    from lisa_dist.config import load_config
    from lisa_dist.distributed import init_distributed, shutdown
    from lisa_dist.env import read_launch_env
    from lisa_dist.train import Trainer, prepare

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    overrides = ["output_dir=/tmp/lisa_dist_host_reads", "overwrite=true", "lisa.interval=100", "save_every=0",
                 "train.dtype=fp32", *sys.argv[1:]]
    config = load_config("configs/tiny.yaml", overrides)
    count_vector_reads()
    env = read_launch_env()
    source, sequences, eval_sequences = prepare(config, env.world_size)
    trainer = Trainer(config, init_distributed(env, config.engine.timeout_s), source, sequences, eval_sequences)
    for step, counts in enumerate(count_steps(trainer, 6), start=1):
        print(f"step {step}: " + ", ".join(f"{key} {n}" for key, n in sorted(counts.items())))
    shutdown()


if __name__ == "__main__":
    main()
