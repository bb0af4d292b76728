"""The output directory: checked before any process starts, metrics written once per step."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lisa_dist import checkpoint as ckpt
from lisa_dist.config import Config, ConfigError

METRICS = "metrics.jsonl"
# Keys that may change between a run and its resume; anything else would change what is trained.
# The engine, its options and the micro-batch split decide where tensors live and how sums are ordered, not
# what is trained: a checkpoint resumes on another engine or world size (equal up to rounding).
RESUMABLE_CHANGES = {"output_dir", "resume", "save_every", "save_total_limit", "progress_bar", "overwrite",
                     "max_steps", "train.max_consecutive_skips", "train.micro_batch_size", "optim.offload_state",
                     "engine.name", "engine.deepspeed_config", "engine.reshard_after_forward", "engine.split_layers",
                     "engine.backward_prefetch", "engine.offload_params", "engine.layer_class", "engine.timeout_s"}


def holds_run(out: Path) -> bool:
    return (out / METRICS).exists() or (out / "final").exists() or (out / "checkpoints").exists()


def check_output_dir(config: Config) -> None:
    """Writable, and not holding another run unless resuming or overwriting; raises ConfigError."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    if config.resume is None and not config.overwrite and holds_run(out):
        raise ConfigError(f"output_dir {out} already holds a run; pass resume=auto to continue it, "
                          "overwrite=true to replace it, or choose another output_dir")
    if config.resume not in (None, "auto") and not ckpt.is_complete(Path(config.resume)):
        raise ConfigError(f"resume={config.resume}: not a complete checkpoint directory")


def clear_previous_run(config: Config) -> None:
    """Rank 0, fresh runs only: with overwrite=true the earlier run's outputs go."""
    out = Path(config.output_dir)
    if config.resume is None:
        (out / METRICS).unlink(missing_ok=True)
        for name in ("checkpoints", "final"):
            if (out / name).exists():
                shutil.rmtree(out / name)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict[str, Any], config: Config) -> None:
    old, new = _flatten(saved), _flatten(config.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ckpt.CheckpointError(f"the checkpoint was written with a different configuration ({details}); "
                                   "resuming would not continue the same run")
    if old["max_steps"] != new["max_steps"] and (config.optim.schedule != "constant"):
        raise ckpt.CheckpointError(f"max_steps changed from {old['max_steps']} to {new['max_steps']} with the "
                                   f"{config.optim.schedule} schedule, which depends on it")


class MetricsWriter:
    def __init__(self, out: Path) -> None:
        self.path = out / METRICS

    def keep_until(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, which will be run again."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)  # a crash here leaves the old file or the new one, never half of it

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
