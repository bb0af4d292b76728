"""What `async_save` saves training and what it costs in host memory, side by side in one invocation: the same
job with no step checkpoints, with synchronous ones and with background ones, in paired rounds (every other round
in reverse order; this machine's noise moves whole rounds).

    .venv/bin/python -m benchmarks.async_save                          # the 42M-parameter shape, full + AdamW
    .venv/bin/python -m benchmarks.async_save --rounds 5 --steps 10 --save-every 2 engine.name=zero3 ...

Each run is its own launch of `--nproc` ranks (2; one per GPU on a GPU machine). A rank times its training
loop from the end of step 1 (which builds the optimizer state) to the end of the run's last save, including the
wait for a background checkpoint to be written and its publication (hashes, marker, rename); per step, that is
what checkpointing costs training. It also reports its peak resident host memory (getrusage) and the bytes of
the checkpoint shards it wrote. The cost of checkpointing is each saving mode's loop time per step less the
unsaved run's, from the same round; `--summarize OUT` prints it again from an earlier invocation's files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "benchmarks" / "shapes" / "h512_l8_lomo.yaml"
JOB = ["method=full", "optim.name=adamw", "optim.lr=1e-4", "save_total_limit=2"]
MODES = {"no_save": ["save_every=0"], "sync": [], "async": ["async_save=true"]}


def _timed_trainer(base: type) -> type:
    class TimedTrainer(base):  # type: ignore[misc, valid-type]
        """A Trainer that notes when each step and each save ends."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.marks: list[tuple[str, int, float]] = []

        def _measured_step(self, step: int) -> dict[str, Any]:
            record = super()._measured_step(step)
            self.marks.append(("step", step + 1, time.perf_counter()))
            return record

        def _save_and_prune(self, step: int, retry_later: bool = True) -> Path | None:
            saved = super()._save_and_prune(step, retry_later)
            self.marks.append(("save", step, time.perf_counter()))
            return saved

        def save_final(self) -> Path:
            self._finish_pending_save()
            self.marks.append(("published", self.config.max_steps, time.perf_counter()))
            return super().save_final()

    return TimedTrainer


def worker(config_path: str, result: str, overrides: list[str]) -> None:
    """One rank of one run (under torchrun): train, then write this rank's timings to `result`.RANK.json."""
    from lisa_dist import train
    from lisa_dist.config import load_config
    from lisa_dist.distributed import init_distributed, shutdown
    from lisa_dist.env import read_launch_env

    config = load_config(Path(config_path), overrides)
    env = read_launch_env()
    source, sequences, eval_sequences = train.prepare(config, env.world_size)
    runtime = init_distributed(env, config.engine.timeout_s)
    trainer = _timed_trainer(train.Trainer)(config, runtime, source, sequences, eval_sequences)
    trainer.fit()
    shutdown()
    marks = trainer.marks
    first = next(t for kind, step, t in marks if kind == "step" and step == 1)
    Path(f"{result}.{env.rank}.json").write_text(json.dumps({
        "loop_s": marks[-1][2] - first, "steps": config.max_steps, "marks": marks,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "shard_mib": _shard_mib(Path(config.output_dir), env.rank)}))


def _shard_mib(output_dir: Path, rank: int) -> float:
    """The size of `rank`'s shard files in the newest step checkpoint (0 when none was saved)."""
    steps = sorted((output_dir / "checkpoints").glob("step_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))
    return sum(p.stat().st_size for p in steps[-1].glob(f"__{rank}_*.distcp")) / 2 ** 20 if steps else 0.0


def run_one(mode: str, config: Path, overrides: list[str], out: Path, nproc: int = 2) -> dict[str, Any]:
    result = out / mode / "result"
    result.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    args = [str(config), str(result), *JOB, *overrides, *MODES[mode], f"output_dir={out / mode}", "overwrite=true",
            "progress_bar=false"]
    done = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc), "-m",
                           "benchmarks.async_save", "--worker", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return read_run(result)


def read_run(result: Path) -> dict[str, Any]:
    """A run's figures from its ranks' result files: the slower rank's loop time per step, the larger peak RSS
    and share of a checkpoint, and every rank's time held in each save and in each step after one."""
    ranks = [json.loads(p.read_text()) for p in result.parent.glob(f"{result.name}.[0-9]*.json")]
    pairs = [(a, b) for r in ranks for a, b in zip(r["marks"], r["marks"][1:])]
    return {"per_step_s": max(r["loop_s"] for r in ranks) / (ranks[0]["steps"] - 1),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
            "shard_mib": max(r["shard_mib"] for r in ranks),
            "held_s": [b[2] - a[2] for a, b in pairs if b[0] in ("save", "published") and b[2] - a[2] > 1e-3],
            "after_save_s": [b[2] - a[2] for a, b in pairs if a[0] == "save" and b[0] == "step"],
            "step_s": [b[2] - a[2] for a, b in pairs if a[0] == "step" and b[0] == "step" and b[1] >= 3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (one GPU each on a GPU machine)")
    parser.add_argument("--summarize", type=Path, default=None, metavar="OUT",
                        help="print the summary of an earlier invocation's --out, running nothing")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the config, for every run")
    args = parser.parse_args(argv)
    if args.summarize:
        rounds = sorted(args.summarize.glob("round[0-9]*"), key=lambda p: int(p.name[5:]))
        _summary([{mode: read_run(r / mode / "result") for mode in MODES} for r in rounds])
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="async_save_"))
    overrides = [f"max_steps={args.steps}", f"save_every={args.save_every}", *args.overrides]
    print(f"config {args.config} {' '.join(JOB + overrides)}; loop time per step over steps 2..{args.steps}")
    print("| round | " + " | ".join(f"{m} s/step" for m in MODES) + " | " +
          " | ".join(f"{m} peak RSS MiB" for m in MODES) + " |")
    print("| --- |" + " --- |" * 2 * len(MODES))
    rows = []
    for i in range(args.rounds):
        order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
        row = {mode: run_one(mode, args.config, overrides, out / f"round{i + 1}", args.nproc) for mode in order}
        rows.append(row)
        print(f"| {i + 1} | " + " | ".join(f"{row[m]['per_step_s']:.3f}" for m in MODES) + " | " +
              " | ".join(f"{row[m]['peak_rss_mib']:.0f}" for m in MODES) + " |", flush=True)
    _summary(rows)
    (out / "rounds.json").write_text(json.dumps(rows, indent=1))
    return 0


def _summary(rows: list[dict[str, dict[str, float]]]) -> None:
    """Each saving mode's cost per step over the unsaved run's, and its extra peak host memory, medians."""
    shard = statistics.median(r["sync"]["shard_mib"] for r in rows)
    print(f"\none rank's share of a checkpoint: {shard:.1f} MiB")
    for mode in ("sync", "async"):
        cost = [r[mode]["per_step_s"] - r["no_save"]["per_step_s"] for r in rows]
        ratio = [r[mode]["per_step_s"] / r["no_save"]["per_step_s"] for r in rows]
        rss = [r[mode]["peak_rss_mib"] - r["no_save"]["peak_rss_mib"] for r in rows]
        held = statistics.median(t for r in rows for t in r[mode]["held_s"])
        after = statistics.median(t for r in rows for t in r[mode]["after_save_s"])
        print(f"{mode}: +{statistics.median(cost):.3f} s per step ({min(cost):.3f} to {max(cost):.3f}), "
              f"{statistics.median(ratio):.3f} x the unsaved loop; peak RSS +{statistics.median(rss):.0f} MiB "
              f"({min(rss):.0f} to {max(rss):.0f}); training held {held:.2f} s per save (median), the step "
              f"after a save {after:.2f} s")
    steps = [t for r in rows for t in r["no_save"]["step_s"]]
    print(f"no_save: a step {statistics.median(steps):.2f} s (median of steps 3 on)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(main())
