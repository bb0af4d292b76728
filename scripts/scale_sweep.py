"""LLaMA-2-70B at 8, 16 and 64 ranks (one, two and eight nodes of 8): `lisa-dist estimate` (FSDP2) and
`lisa-dist plan` (FSDP2 and ZeRO-3) for both 70B configs, as a markdown table (docs/estimate.md).

Usage: .venv/bin/python scripts/scale_sweep.py [WORLD ...]   (about 2 minutes per estimate)
"""

import subprocess
import sys
import json

WORLDS = [int(w) for w in sys.argv[1:]] or [8, 16, 64]


def run(command: str, config: str, world: int, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "lisa_dist", command, f"configs/llama2_70b_{config}.yaml", f"--world-size={world}",
           "--json", f"train.global_batch_size={world}", *overrides]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


print("| config | ranks | estimate (FSDP2) | plan FSDP2 | plan ZeRO-3 | host memory per rank (plan) "
      "| sent per rank per step (plan) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for config in ("lisa", "lomo"):
    for world in WORLDS:
        estimate = run("estimate", config, world)
        plan = run("plan", config, world)
        zero3 = run("plan", config, world, "engine.name=zero3", "engine.split_layers=false")
        cells = [f"{r['peak_gib']:.2f} GiB ({'fits' if r['fits'] else 'no'})" for r in (estimate, plan, zero3)]
        print(f"| {config} | {world} | {' | '.join(cells)} | {plan['host_offload_gib']:.2f} GiB "
              f"| {plan['send_gib_per_step']['total']:.1f} GiB |", flush=True)
