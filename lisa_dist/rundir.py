"""The output directory: checked before any process starts, metrics written once per step."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lisa_dist import checkpoint as ckpt
from lisa_dist.config import Config
from lisa_dist.errors import ConfigError

METRICS = "metrics.jsonl"


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


class MetricsWriter:
    def __init__(self, out: Path) -> None:
        self.path = out / METRICS

    def keep_until(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, which will be run again."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)  # a crash here leaves the old file or the new one, never half of it

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a crash while it was written (it can only be the last) counts as
    after any checkpoint, so it is dropped with the steps that run again."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
