"""`lisa-dist plan` against `lisa-dist estimate` for each preset, method and lever set (docs/plan.md).

Four-layer models of each preset's shapes, 8 ranks, 2048 tokens, micro-batch 1, bf16 (seconds each).
Usage: .venv/bin/python scripts/plan_vs_estimate.py [PRESET ...]   (default: the three LLaMA-2 presets)
"""

import sys

from lisa_dist.config import load_config
from lisa_dist.sizing.estimate import run_estimate
from lisa_dist.sizing.plan import run_plan

COMMON = ["model.path=null", "model.num_layers=4", "data.seq_len=2048", "train.global_batch_size=8",
          "train.micro_batch_size=1", "train.dtype=bf16", "lisa.gamma=2", "lisa.interval=5"]
LEVER_SETS = {
    "checkpointing": ["model.activation_checkpointing=true"],
    "no checkpointing": ["model.activation_checkpointing=false"],
    "offload params": ["model.activation_checkpointing=true", "engine.offload_params=true"],
    "all levers": ["model.activation_checkpointing=true", "engine.split_layers=true", "model.activation_offload=true",
                   "train.reduce_dtype=param", "optim.offload_state=true"],
}

print("| preset (4 layers) | settings | method | estimate GiB | plan GiB | plan / estimate |")
print("| --- | --- | --- | --- | --- | --- |")
for preset in sys.argv[1:] or ("llama2-7b", "llama2-13b", "llama2-70b"):
    for lever_name, levers in LEVER_SETS.items():
        for method, optim in (("lisa", "adamw"), ("full", "lomo"), ("full", "adamw")):
            config = load_config("configs/tiny.yaml", [*COMMON, f"model.preset={preset}", f"method={method}",
                                                       f"optim.name={optim}", *levers])
            estimated = run_estimate(config, 8, 80)["peak_gib"]
            planned = run_plan(config, 8, 80, suggest=False)["peak_gib"]
            print(f"| {preset} | {lever_name} | {method} + {optim} | {estimated:.3f} | {planned:.3f} "
                  f"| {planned / estimated:.3f} |", flush=True)
