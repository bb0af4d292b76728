"""Shared test helpers: tiny configs and a runner for gloo multi-process workers."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import yaml

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from lisa_dist.config import Config, from_dict, validate


REPO = Path(__file__).resolve().parents[1]


def tiny_config(output_dir: Path | str, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "seed": 0, "max_steps": 6, "output_dir": str(output_dir), "method": "lisa", "progress_bar": False,
        "lisa": {"gamma": 2, "interval": 3},
        "model": {"path": str(TINY_MODEL_DIR)},
        "data": {"path": str(TINY_ALPACA), "seq_len": 48},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "dtype": "fp32"},
        "optim": {"name": "adamw", "lr": 1e-3, "max_grad_norm": 0.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    config = from_dict(raw)
    validate(config)
    return config


def accelerate_variant(out_dir: Path, name: str, **changes: Any) -> Path:
    """configs/accelerate/NAME with `section__key=value` (or top-level `key=value`) changes, written to out_dir."""
    raw = yaml.safe_load((REPO / "configs" / "accelerate" / name).read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[field] = value
    path = Path(out_dir) / name
    path.write_text(yaml.safe_dump(raw))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], out_dir: str, kwargs: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test", "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    result = fn(rank=rank, world_size=world_size, **kwargs)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Like `lisa-dist train`: the interpreter's teardown sometimes aborts on gloo/DeepSpeed threads
    # ("terminate called without an active exception") after all work is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, **kwargs: Any) -> list[Any]:
    """Run `fn(rank=, world_size=, **kwargs)` in `world_size` spawned processes; return each rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, out_dir, kwargs), nprocs=world_size,
                           start_method="spawn", join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def start_trainer(config: Config):
    """Inside a worker: the process group, the engine and a Trainer, as `lisa-dist train` builds them."""
    from lisa_dist.distributed import init_distributed
    from lisa_dist.env import read_launch_env
    from lisa_dist.train import Trainer, prepare

    env = read_launch_env()
    source, sequences = prepare(config, env.world_size)
    runtime = init_distributed(env, config.engine.timeout_s)
    return Trainer(config, runtime, source, sequences)


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Unsharded weights on every rank (all-gathered DTensors), for comparisons."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in trainer.model.named_parameters():
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
    return out


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> None:
    """Element-wise within a fraction of one optimizer step, and the two runs' updates agree to 0.1%.

    Adam divides by the root of tiny second moments, so a rounding-level difference in a near-zero gradient
    can move a single element by a visible amount; the update-norm check is what catches real errors."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        update = (b[name] - start[name]).norm()
        if update > 0:
            assert (a[name] - b[name]).norm() / update < 1e-3, name


def tiny_start_weights() -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}
