"""The benchmark half of `scripts/gpu_check.sh`: on one GPU, tokens/s and the CUDA allocator's peak of
full+adamw, lisa+adamw, full+lomo and full+adalomo against plain FSDP2 + AdamW, and each lisa_dist peak
against `lisa-dist estimate` of the same job, as a markdown table.

    python -m benchmarks.gpu_check --out gpu_check        # writes gpu_check/gpu_check.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from benchmarks.speed_memory import RUNS, run_one
from lisa_dist.config import load_config
from lisa_dist.sizing.estimate import run_estimate

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "benchmarks" / "shapes" / "gpu_7b_shallow.yaml"
NAMES = ["fsdp2_adamw", "lisa_dist_fsdp2_full_adamw", "lisa_dist_fsdp2_lisa_adamw", "lisa_dist_fsdp2_full_lomo",
         "lisa_dist_fsdp2_full_adalomo"]


def estimated_gib(name: str, overrides: list[str]) -> float | None:
    """`lisa-dist estimate --world-size 1` of a lisa_dist run (None for the baseline), on the CPU."""
    spec = RUNS[name]
    if isinstance(spec, str):
        return None
    config = load_config(CONFIG, [*overrides, *spec])
    return run_estimate(config, world_size=1, gpu_mem_gib=1e6)["peak_gib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="key=value changes to the job, for every run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}): the "
              "benchmark measures the GPU's allocator and step time, so it ran nothing", file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(name, CONFIG, args.overrides, args.steps, args.out / "runs", nproc=1) for name in NAMES]
    baseline, full = rows[0], rows[1]
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the estimates run on fake tensors; keep them off the GPU
    lines = [f"Job: `{CONFIG.relative_to(REPO)}` {' '.join(args.overrides)}; {args.steps} steps, medians over "
             f"steps 2..{args.steps}; peaks are `torch.cuda.max_memory_allocated` per step, the largest.", "",
             "Targets of the step-time ratios (docs/speed_memory.md): full + AdamW at most 1.02 x plain FSDP2; LOMO "
             "and AdaLomo at most 1.00 x full + AdamW; LISA (gamma 2 of the 4 layers here) below full + AdamW.", "",
             "| run | median step s | tokens/s | step time / plain FSDP2 + AdamW | "
             "step time / lisa_dist full + AdamW | allocator peak GiB | `estimate` GiB | estimate / peak | "
             "loss at the last step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        estimate = estimated_gib(row["name"], args.overrides)
        peak = row["peak_mib"] / 1024
        lines.append(f"| {row['name']} | {row['median_step_s']:.3f} | {row['tokens_per_s']:.0f} | "
                     f"{row['median_step_s'] / baseline['median_step_s']:.3f} | "
                     f"{row['median_step_s'] / full['median_step_s']:.3f} | {peak:.2f} | "
                     f"{'-' if estimate is None else f'{estimate:.2f}'} | "
                     f"{'-' if estimate is None else f'{estimate / peak:.3f}'} | {row['final_loss']:.4f} |")
    table = "\n".join(lines) + "\n"
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
