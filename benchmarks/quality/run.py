"""The quality benchmark: does a layer-sampling strategy help, and how do LISA, full fine-tuning, LoRA and
LOMO compare at their memory? One command:

    .venv/bin/python -m benchmarks.quality.run            # every method, 3 seeds (about an hour on 2 cores)
    .venv/bin/python -m benchmarks.quality.run --quick    # the pipeline, and that full fine-tuning learns
    .venv/bin/python -m benchmarks.quality.run --base moe # a Mixtral base: LISA over layers and over experts
    .venv/bin/python -m benchmarks.quality.run --task strings  # a string transformation; LISA's inactive updates

It pre-trains the base model once (cached), fine-tunes it with each method and seed (lisa-dist on 2 CPU
ranks; LoRA through peft in one process), and scores each final model on held-out data by exact match of
greedy completions and by mean token loss. Results go to OUT/results.json (kept: a rerun skips done runs)
and OUT/table.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

from benchmarks.quality.methods import BUDGETS, INACTIVE_METHODS, METHODS, MOE_METHODS, Budget, Method, methods_at
from benchmarks.quality.pretrain import MOE_BASE, QUICK_BASE, QUICK_MOE_BASE, TASKS, BaseModel, pretrain
from benchmarks.quality.score import exact_match
from benchmarks.quality.task import write_jsonl
from lisa_dist.data import build_sequences, load_examples

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH, WARMUP, MIN_LR_RATIO = 64, 16, 8, 10, 0.1


def _finetune_config(base: Path, train_path: Path, out: Path, seed: int, steps: int) -> dict:
    return {"seed": seed, "max_steps": steps, "output_dir": str(out), "overwrite": True, "save_every": 0,
            "model": {"path": str(base)}, "data": {"path": str(train_path), "seq_len": SEQ_LEN},
            "train": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH, "dtype": "fp32"},
            "optim": {"weight_decay": 0.0, "max_grad_norm": 1.0, "warmup_steps": WARMUP, "schedule": "cosine",
                      "min_lr_ratio": MIN_LR_RATIO}}


def _run_lisa_dist(method: Method, base: Path, train_path: Path, out: Path, seed: int, steps: int,
                   extra: tuple[str, ...] = ()) -> dict:
    config = out.with_suffix(".yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(_finetune_config(base, train_path, out, seed, steps)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "lisa_dist", "train", str(config), *method.overrides, *extra]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method.name} seed {seed} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    return {"peak_mib": max(r["peak_mem_gib"] for r in steps_rows) * 1024,
            "state_mib": statistics.mean(r["optim_state_gib"] for r in steps_rows) * 1024,
            "step_s": statistics.median(r["step_time_s"] for r in steps_rows[1:])}


@torch.no_grad()
def _eval_loss(model: transformers.PreTrainedModel, tokenizer, held_path: Path) -> float:
    sequences = build_sequences(load_examples(held_path, tokenizer), SEQ_LEN, tokenizer.pad_token_id, pack=False)
    total = targets = 0.0
    for start in range(0, len(sequences), 64):
        ids, labels = sequences.input_ids[start:start + 64], sequences.labels[start:start + 64]
        mask = sequences.attention_mask[start:start + 64]
        logits = model(input_ids=ids, attention_mask=mask).logits
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                   ignore_index=-100, reduction="sum").item()
        targets += int((labels[:, 1:] != -100).sum())
    return total / targets


def _score(model_dir: Path, rows: dict[str, list[dict]], held_path: Path) -> dict:
    """Held-out exact match and loss, and exact match on the first training questions (what was learnt by
    heart, beside what carries over to the held-out creatures)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.output_router_logits = False  # a Mixtral's load-balancing loss is training's, and breaks generate
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return {"exact_match": exact_match(model, tokenizer, rows["held"]),
            "train_exact_match": exact_match(model, tokenizer, rows["train"][:64]),
            "eval_loss": _eval_loss(model, tokenizer, held_path)}


def run_one(method: Method, base: Path, data: dict[str, Path], rows: dict[str, list[dict]], out: Path, seed: int,
            steps: int, lora_lr: float, extra: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    if method.lora:
        from benchmarks.quality.lora import train_lora  # peft: pip install -e '.[benchmark]'

        measured = train_lora(base, data["train"], out, seed, steps, lora_lr, SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH,
                              WARMUP, MIN_LR_RATIO)
    else:
        measured = _run_lisa_dist(method, base, data["train"], out, seed, steps, extra)
    return {"method": method.name, "seed": seed, **measured, **_score(out / "final", rows, data["held"]),
            "wall_s": time.perf_counter() - start}


def table(results: list[dict], methods: list[str]) -> str:
    lines = ["| method | held-out exact match, mean | per seed | training questions | held-out loss, mean | "
             "peak MiB per rank | optimizer state MiB per rank, mean | step s (median) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in methods:
        rows = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        if not rows:
            continue
        em = [r["exact_match"] for r in rows]
        state = [r["state_mib"] for r in rows if "state_mib" in r]  # LoRA's runs and older results have none
        lines.append(f"| {name} | {100 * statistics.mean(em):.1f} % | "
                     f"{', '.join(f'{100 * e:.0f}' for e in em)} | "
                     f"{100 * statistics.mean(r['train_exact_match'] for r in rows):.0f} % | "
                     f"{statistics.mean(r['eval_loss'] for r in rows):.3f} | "
                     f"{statistics.mean(r['peak_mib'] for r in rows):.1f} | "
                     f"{f'{statistics.mean(state):.2f}' if state else '-'} | "
                     f"{statistics.median(r['step_s'] for r in rows):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small base model and full fine-tuning only "
                        "(with --base moe: and LISA over experts by routing)")
    parser.add_argument("--base", choices=["dense", "moe"], default="dense",
                        help="moe: a Mixtral of 8 experts (top 2) per layer and the methods of MOE_METHODS")
    parser.add_argument("--task", choices=list(TASKS), default="creatures",
                        help="strings: the string transformation (strings.py), 600 steps, INACTIVE_METHODS")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps (default the task's calibrated budget, methods.BUDGETS; quick 30)")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / "quality" / ".cache")
    parser.add_argument("--out", type=Path, default=None,
                        help="default runs/quality (runs/quality_moe, runs/quality_strings)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="appended to every lisa-dist method's overrides (say optim.lr=3e-4, to see how "
                             "another rate moves the table); use another --out")
    args = parser.parse_args(argv)
    moe, strings = args.base == "moe", args.task == "strings"
    args.out = args.out or REPO / "runs" / ("quality_moe" if moe else "quality_strings" if strings else "quality")
    quick_methods = ["full_adamw", "lisa_expert_routing"] if moe else ["full_adamw"]
    everything = MOE_METHODS if moe else INACTIVE_METHODS if strings else [
        name for name in METHODS if name not in MOE_METHODS[2:] and not name.startswith("lisa_inactive")]
    methods = args.methods or (quick_methods if args.quick else everything)
    budget: Budget = BUDGETS[args.task]
    by_name = methods_at(budget)
    if args.override and any(by_name[name].lora for name in methods):
        parser.error("--override applies to lisa-dist methods; leave lora out (--methods ...)")
    steps = args.steps or (30 if args.quick else budget.steps)
    seeds = 1 if args.quick else args.seeds
    spec = {(False, False): BaseModel(), (True, False): QUICK_BASE, (False, True): MOE_BASE,
            (True, True): QUICK_MOE_BASE}[args.quick, moe]
    base = pretrain(dataclasses.replace(spec, task=args.task), args.cache_dir)
    train_rows, held_rows = TASKS[args.task].task_splits()
    rows = {"train": train_rows, "held": held_rows}
    data = {"train": write_jsonl(args.out / "data" / "train.jsonl", train_rows),
            "held": write_jsonl(args.out / "data" / "held_out.jsonl", held_rows)}
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    base_score = {"method": "base", **_score(base, rows, data["held"])}
    (args.out / "base.json").write_text(json.dumps(base_score))
    print(f"base model: exact match {100 * base_score['exact_match']:.1f} %, held-out loss "
          f"{base_score['eval_loss']:.3f}", flush=True)
    for name in methods:
        for seed in range(seeds):
            if any(r["method"] == name and r["seed"] == seed and r.get("steps") == steps for r in results):
                continue
            row = {**run_one(by_name[name], base, data, rows, args.out / name / f"seed{seed}", seed, steps,
                             budget.lora, tuple(args.override)), "steps": steps, "overrides": args.override}
            results.append(row)
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{name} seed {seed}: exact match {100 * row['exact_match']:.1f} % (training questions "
                  f"{100 * row['train_exact_match']:.0f} %), held-out loss "
                  f"{row['eval_loss']:.3f}, peak {row['peak_mib']:.1f} MiB, step {row['step_s']:.3f} s "
                  f"({row['wall_s']:.0f} s)", flush=True)
    done = [r for r in results if r.get("steps") == steps]
    (args.out / "table.md").write_text(table(done, methods))
    print(table(done, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
