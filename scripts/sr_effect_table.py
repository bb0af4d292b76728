"""Table for scripts/sr_effect.sh: how far bf16 LOMO runs drift from the fp32 run, with and without SR."""

import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def flat_delta(final: dict, start: dict) -> torch.Tensor:
    return torch.cat([(final[k].float() - start[k].float()).flatten() for k in sorted(final)])


def main(out: Path) -> None:
    start32 = load_file("lisa_dist/assets/tiny-llama/model.safetensors")
    start16 = {k: v.to(torch.bfloat16) for k, v in start32.items()}  # what the bf16 runs start from
    print("| lr | run | loss, mean of last 10 steps | update kept, vs fp32 run (norm ratio) | cosine to fp32 update | "
          "elements never changed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for lr in ("0.001", "0.003"):
        ref = flat_delta(load_file(out / f"lr{lr}_fp32_srfalse" / "final" / "model.safetensors"), start32)
        for name in ("fp32_srfalse", "bf16_srfalse", "bf16_srtrue"):
            run = out / f"lr{lr}_{name}"
            losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            final = load_file(run / "final" / "model.safetensors")
            delta = flat_delta(final, start32 if name.startswith("fp32") else start16)
            cos = torch.nn.functional.cosine_similarity(delta, ref, dim=0).item()
            unchanged = (delta == 0).float().mean().item()
            print(f"| {lr} | {name} | {statistics.mean(losses[-10:]):.4f} | {(delta.norm() / ref.norm()).item():.3f} | "
                  f"{cos:.3f} | {unchanged:.1%} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
