"""A random-kill soak: N training jobs under `torchrun --max-restarts`, each losing a random rank to kill -9 at a
random moment (start-up, a step, a collective, a checkpoint write, pruning), and each checked to end with the
uninterrupted run's final weights bit for bit and a metrics.jsonl holding every step once.

    scripts/soak.sh N [--seed S] [--engine fsdp2|zero3] [--out DIR]

The moment of job i is drawn from Random(S + i): the rank, then start-up or training with even odds, then a
delay uniform over that phase of the reference run (start-up: until its first step is logged; training: from
there to 95 % of its wall time, which holds the steps, their collectives, the checkpoint writes and pruning).
Each row says what the job was doing when the kill came (steps logged, a checkpoint being written); the exit
status is 1 if any job failed its check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
RUN = ["data.seq_len=48", "lisa.interval=2", "optim.schedule=constant", "optim.warmup_steps=0",
       "train.global_batch_size=8", "train.micro_batch_size=2", "train.dtype=fp32", "progress_bar=false",
       f"max_steps={STEPS}", "save_every=2", "save_total_limit=2", "resume=auto"]
ENGINES = {"fsdp2": [], "zero3": ["engine.name=zero3",
                                  f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero3.json'}"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out: Path, engine: str, restarts: int) -> list[str]:
    from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
            f"--max-restarts={restarts}", "-m", "lisa_dist", "train", str(REPO / "configs" / "tiny.yaml"),
            f"model.path={TINY_MODEL_DIR}", f"data.path={TINY_ALPACA}", *RUN, *ENGINES[engine], f"output_dir={out}"]


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun (pid `parent`) started."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, ValueError):
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                found[int(entry[5:])] = int(stat.parent.name)
    return found


def _moment(out: Path) -> str:
    """What the run was doing: steps logged, and a checkpoint directory being written."""
    metrics = out / "metrics.jsonl"
    steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    writing = sorted(p.name for p in (out / "checkpoints").glob("*.tmp")) if (out / "checkpoints").exists() else []
    return f"{steps} steps logged" + (f", writing {writing[0]}" if writing else "")


def check(out: Path, reference: Path) -> str | None:
    """None when `out` ended as the reference did; else what differs."""
    if not (out / "final" / "model.safetensors").is_file():
        return "no final model"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    if steps != list(range(1, STEPS + 1)):
        return f"metrics.jsonl steps {steps}"
    final = load_file(out / "final" / "model.safetensors")
    expected = load_file(reference / "final" / "model.safetensors")
    differing = [name for name in expected if not torch.equal(final[name], expected[name])]
    return f"final weights differ: {', '.join(differing[:3])}" if differing else None


def reference_run(out: Path, engine: str, env: dict) -> tuple[float, float]:
    """The uninterrupted run; (seconds to its first logged step, seconds in all)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    job = subprocess.Popen(_command(out, engine, restarts=0), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    start, first = time.monotonic(), None
    while job.poll() is None:
        if first is None and (out / "metrics.jsonl").exists():
            first = time.monotonic() - start
        time.sleep(0.005)
    if job.returncode:
        raise RuntimeError(f"the reference run failed:\n{job.stderr.read()[-3000:]}")
    return first, time.monotonic() - start


def one_job(out: Path, reference: Path, engine: str, rng: random.Random, phases: tuple[float, float],
            env: dict) -> dict:
    first, span = phases
    rank = rng.randrange(2)
    delay = rng.uniform(0.0, first) if rng.random() < 0.5 else rng.uniform(first, 0.95 * span)
    log = (out.parent / f"{out.name}.log").open("w")
    job = subprocess.Popen(_command(out, engine, restarts=2), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.monotonic()
    while time.monotonic() - start < delay or rank not in worker_pids(job.pid):
        if job.poll() is not None:
            break
        time.sleep(0.005)
    pids, moment = worker_pids(job.pid), _moment(out)
    if rank in pids and job.poll() is None:
        os.kill(pids[rank], signal.SIGKILL)
        killed = f"rank {rank} at {time.monotonic() - start:.2f} s ({moment})"
    else:
        killed = "none: the job ended first"
    code = job.wait(timeout=600)
    problem = f"exit status {code}" if code else check(out, reference)
    return {"job": out.name, "killed": killed, "ok": problem is None, "problem": problem,
            "restarts": (out.parent / f"{out.name}.log").read_text().count("training sequences")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=list(ENGINES), default="fsdp2")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "soak")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    args.out.mkdir(parents=True, exist_ok=True)
    reference = args.out / "reference"
    # The moments come from a second run's times: the first launch after an install is seconds slower, and
    # drawn from its times many of ZeRO-3's moments fell after the job had ended.
    reference_run(reference, args.engine, env)
    phases = reference_run(reference, args.engine, env)
    print(f"reference run: first step logged at {phases[0]:.1f} s, done at {phases[1]:.1f} s; {args.jobs} jobs, "
          f"seeds {args.seed}..{args.seed + args.jobs - 1}", flush=True)
    failed = 0
    for i in range(args.jobs):
        out = args.out / f"job_{args.seed + i}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        row = one_job(out, reference, args.engine, random.Random(args.seed + i), phases, env)
        failed += not row["ok"]
        print(f"seed {args.seed + i}: killed {row['killed']}; rank 0 started {row['restarts']} times; "
              f"{'same weights, every step once' if row['ok'] else 'FAILED: ' + row['problem']}", flush=True)
    print(f"{args.jobs - failed} of {args.jobs} jobs ended as the uninterrupted run did")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
