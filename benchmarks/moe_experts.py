"""Time transformers' experts implementations side by side: the eager loop over the experts a batch hits, and
grouped matrix products (`model.experts_implementation`, docs/models.md).

A small Qwen3-MoE (4 layers, hidden 256, experts of width 128; by default 32 of them, top 4) takes forward and
backward over a batch of 4 x 256 tokens, each implementation in turn, `--rounds` times; the median of each and
the median of their per-round ratios are printed. One process, on the CPU (or the GPU with --device cuda).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe_experts.py [--dtype bf16] [--experts 128 --top-k 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

SHAPE = dict(model_type="qwen3_moe", vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
             num_experts_per_tok=4, max_position_embeddings=512)
IMPLEMENTATIONS = ("eager", "grouped_mm")


def step_seconds(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


# Operators whose output size or value the host must read: on a GPU each waits for the stream to drain.
HOST_READS = {"aten.nonzero.default", "aten._local_scalar_dense.default"}


class CountHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += str(func) in HOST_READS
        return func(*args, **(kwargs or {}))


def host_reads(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    with CountHostReads() as counter:
        step_seconds(model, input_ids)
    return counter.count


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Prints the comparison; returns per implementation its host reads and median seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    models = {}
    for name in IMPLEMENTATIONS:
        # A config each: the model reads its experts implementation from its config object at every forward.
        config = transformers.AutoConfig.for_model(**{**SHAPE, "num_experts": args.experts,
                                                      "num_experts_per_tok": args.top_k})
        torch.manual_seed(0)
        models[name] = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=name,
                                                                      dtype=dtype).to(args.device).train()
        assert models[name].config._experts_implementation == name
    input_ids = torch.randint(0, SHAPE["vocab_size"], (4, args.tokens), device=args.device)
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for round_ in range(args.rounds + 1):  # the first round warms up and is not counted
        order = IMPLEMENTATIONS if round_ % 2 else IMPLEMENTATIONS[::-1]
        for name in order:
            seconds = step_seconds(models[name], input_ids)
            if round_:
                times[name].append(seconds)
    ratios = [a / b for a, b in zip(times["grouped_mm"], times["eager"])]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}, {args.device}, "
          f"{args.experts} experts, top {args.top_k}, 4 x {args.tokens} tokens, {args.rounds} rounds")
    reads = {name: host_reads(models[name], input_ids) for name in IMPLEMENTATIONS}
    for name in IMPLEMENTATIONS:
        print(f"{name}: {reads[name]} host reads (nonzero, item) per forward and backward")
    for name in IMPLEMENTATIONS:
        print(f"{name}: median {statistics.median(times[name]) * 1000:.1f} ms per forward and backward "
              f"(min {min(times[name]) * 1000:.1f}, max {max(times[name]) * 1000:.1f})")
    print(f"grouped_mm / eager: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return {name: {"host_reads": reads[name], "median_s": statistics.median(times[name])} for name in IMPLEMENTATIONS}


if __name__ == "__main__":
    main()
