"""Median step time and peak memory per rank, side by side in one invocation: plain FSDP2 + AdamW,
DeepSpeed ZeRO-3 + AdamW (`benchmarks/baselines.py`), and lisa_dist's methods on both engines. Each run is
its own launch (2 ranks unless `--nproc`), one after another; the first step is left out of the medians (it builds
optimizer state and, on ZeRO-3, DeepSpeed's prefetch trace).

    .venv/bin/python -m benchmarks.speed_memory                      # the 42M-parameter shape of docs/zero3.md
    .venv/bin/python -m benchmarks.speed_memory --config my.yaml model.config=/path/config.json --steps 8
    .venv/bin/python -m benchmarks.speed_memory --runs lisa_dist_fsdp2_full_lomo,fsdp2_adamw
    .venv/bin/python -m benchmarks.speed_memory --rounds 5 --runs lisa_dist_fsdp2_full_adamw,fsdp2_adamw --steps 10

Prints a markdown table; `--out DIR` keeps each run's metrics. With `--rounds N` the runs go N times, every other
round in reverse order, and each run's step time is given as the median over rounds of its ratio to the first
run's in the same round (this machine's noise moves whole rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lisa_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "benchmarks" / "shapes" / "h512_l8_lomo.yaml"
LOWMEM = str(REPO / "configs" / "deepspeed" / "zero3_lowmem.json")
LR = {"adamw": "1e-4", "lomo": "1e-2", "adalomo": "1e-3"}
# name -> (baseline name, or lisa_dist overrides)
RUNS: dict[str, str | list[str]] = {
    "fsdp2_adamw": "fsdp2_adamw",  # plain FSDP2 + torch.optim.AdamW
    "zero3_adamw": "zero3_adamw",  # DeepSpeed ZeRO-3 with its own AdamW
    **{f"lisa_dist_{engine}_{method}_{optim}": [
        f"engine.name={engine}", *([f"engine.deepspeed_config={LOWMEM}"] if engine == "zero3" else []),
        f"method={method}", f"optim.name={optim}", f"optim.lr={LR[optim]}", "lisa.gamma=2", "lisa.interval=3"]
       for engine in ("fsdp2", "zero3")
       for method, optim in (("full", "adamw"), ("lisa", "adamw"), ("full", "lomo"), ("full", "adalomo"))},
    # LISA + AdamW with the units not sampled updated inside backward (lisa.inactive_update)
    **{f"lisa_dist_{engine}_lisa_adamw_inactive_{rule}": [
        f"engine.name={engine}", *([f"engine.deepspeed_config={LOWMEM}"] if engine == "zero3" else []),
        "method=lisa", "optim.name=adamw", f"optim.lr={LR['adamw']}", "lisa.gamma=2", "lisa.interval=3",
        f"lisa.inactive_update={rule}"]
       for engine in ("fsdp2", "zero3") for rule in ("sgd", "signsgd", "adalomo")},
}


def _torchrun(*args: str, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", str(nproc), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")


def run_one(name: str, config: Path, overrides: list[str], steps: int, out: Path, nproc: int = 2) -> dict:
    common = [f"max_steps={steps}", "save_every=0", f"output_dir={out / name}", "overwrite=true", *overrides]
    spec = RUNS[name]
    if isinstance(spec, str):
        (out / name).mkdir(parents=True, exist_ok=True)
        result = out / name / "result.json"
        _torchrun("-m", "benchmarks.baselines", spec, str(config), str(result), *common, "method=full",
                  "optim.name=adamw", f"optim.lr={LR['adamw']}", nproc=nproc)
        records = json.loads(result.read_text())["records"]
    else:
        _torchrun("-m", "lisa_dist", "train", str(config), *common, *spec, "progress_bar=false", nproc=nproc)
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "step_time_s" in r]
    later = records[1:]
    job = load_config(config, overrides)
    median = statistics.median(r["step_time_s"] for r in later)
    tokens = job.train.global_batch_size * job.data.seq_len  # positions per step (all tokens when packed)
    return {"name": name, "median_step_s": median, "tokens_per_s": tokens / median,
            "peak_mib": max(r["peak_mem_gib"] for r in records) * 1024,
            "final_loss": records[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (one GPU each on a GPU machine)")
    parser.add_argument("--rounds", type=int, default=1, help="paired rounds, in alternating order")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the config, for every run")
    args = parser.parse_args(argv)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first step is left out of the medians)")
    out = args.out or Path(tempfile.mkdtemp(prefix="speed_memory_"))
    print(f"config {args.config} {' '.join(args.overrides)}; {args.steps} steps; medians over steps 2..{args.steps}")
    if args.rounds > 1:
        return _rounds(names, args, out)
    print("| run | median step s | tokens/s, all ranks | peak MiB per rank | loss at the last step |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        row = run_one(name, args.config, args.overrides, args.steps, out, args.nproc)
        print(f"| {name} | {row['median_step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['peak_mib']:.1f} | "
              f"{row['final_loss']:.4f} |", flush=True)
    return 0


def _rounds(names: list[str], args: argparse.Namespace, out: Path) -> int:
    """Each round's median step times, then each run's median ratio to the first run over the rounds."""
    print("| round | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    medians: list[dict[str, float]] = []
    for i in range(args.rounds):
        order = names if i % 2 == 0 else names[::-1]
        step_s = {name: run_one(name, args.config, args.overrides, args.steps, out / f"round{i + 1}",
                                args.nproc)["median_step_s"] for name in order}
        medians.append(step_s)
        print(f"| {i + 1} | " + " | ".join(f"{step_s[n]:.3f}" for n in names) + " |", flush=True)
    ratios = {n: [m[n] / m[names[0]] for m in medians] for n in names}
    print(f"| median ratio to {names[0]} (range) | " + " | ".join(
        f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})" for r in ratios.values()) + " |")
    (out / "rounds.json").write_text(json.dumps({"runs": names, "medians": medians}, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
