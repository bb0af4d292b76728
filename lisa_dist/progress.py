"""What rank 0 tells the user about a run as it goes: a progress bar on a terminal or a progress line every
`logging.log_every` steps without one (SLURM, nohup), and the scalars sent to TensorBoard and W&B."""

from __future__ import annotations

import importlib.util
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from lisa_dist.config import Config
from lisa_dist.errors import ConfigError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "tokens_per_s": "train/tokens_per_s", "peak_mem_gib": "train/peak_mem_gib",
                "optim_state_gib": "train/optim_state_gib"}
EVAL_SCALARS = {"eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity"}


def check_trackers(config: Config) -> None:
    """Before start: every tracker in logging.report_to is installed."""
    for name in config.logging.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"logging.report_to includes {name} but the {TRACKER_PACKAGES[name]} package is not "
                              f"installed; pip install 'lisa_dist[{name}]'")


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def log_layers(self, layers: list[int], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    def __init__(self, config: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(config.output_dir) / "tensorboard"))
        self.writer.add_text("config", f"```\n{config.to_dict()}\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_layers(self, layers: list[int], step: int) -> None:
        self.writer.add_text("train/active_layers", ", ".join(map(str, layers)), step)
        self.writer.add_histogram("train/active_layers", _as_array(layers), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per output_dir: a resumed run continues the same W&B run (its id is kept in output_dir)."""

    def __init__(self, config: Config) -> None:
        import wandb

        out = Path(config.output_dir)
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if config.resume and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(project=config.logging.wandb_project, dir=str(out), name=out.name, id=run_id,
                              resume="allow", config=config.to_dict())

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_layers(self, layers: list[int], step: int) -> None:
        import wandb

        self.run.log({"train/active_layers": wandb.Histogram(_as_array(layers))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _as_array(layers: list[int]) -> Any:
    import numpy

    return numpy.asarray(layers, dtype=numpy.int64)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Reporter:
    """Rank 0's outputs besides metrics.jsonl. Other ranks make one with `is_main=False`: it does nothing."""

    def __init__(self, config: Config, is_main: bool, is_tty: bool, start_step: int) -> None:
        self.config = config
        self.start_step = start_step
        self.started = time.monotonic()
        self.last_eval: float | None = None
        self.trackers: list[Tracker] = [TRACKERS[n](config) for n in config.logging.report_to] if is_main else []
        self.bar = None
        self.lines = is_main and not is_tty
        if is_main and config.progress_bar and is_tty:
            from tqdm import tqdm

            self.bar = tqdm(total=config.max_steps, initial=start_step, desc="train", unit="step")

    def step(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for tracker in self.trackers:
            tracker.log({name: record[key] for key, name in STEP_SCALARS.items() if key in record}, step)
            tracker.log_layers(record["active_layers"], step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", layers=record["active_layers"][:8])
            self.bar.update(1)
        if self.lines and (step % self.config.logging.log_every == 0 or step == self.config.max_steps):
            print(self._line(record), file=sys.stderr, flush=True)

    def evaluation(self, record: dict[str, Any]) -> None:
        self.last_eval = record["eval_loss"]
        for tracker in self.trackers:
            tracker.log({name: record[key] for key, name in EVAL_SCALARS.items()}, record["step"])
        message = (f"lisa-dist: eval at step {record['step']}: loss {record['eval_loss']:.4f}, perplexity "
                   f"{record['eval_perplexity']:.2f} over {record['eval_sequences']} sequences")
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.lines:
            print(message, file=sys.stderr, flush=True)

    def _line(self, record: dict[str, Any]) -> str:
        step, total = record["step"], self.config.max_steps
        elapsed = time.monotonic() - self.started
        remaining = elapsed / max(step - self.start_step, 1) * (total - step)
        eval_part = f" eval_loss {self.last_eval:.4f}" if self.last_eval is not None else ""
        return (f"lisa-dist: step {step}/{total} loss {record['loss']:.4f}{eval_part} lr {record['lr']:.3g} "
                f"tokens/s {record['tokens_per_s']:.0f} peak {_memory(record['peak_mem_gib'])} "
                f"layers {record['active_layers']} elapsed {_clock(elapsed)} remaining {_clock(remaining)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()


def _memory(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
