"""Gradient bytes each rank sends per step (docs/zero3.md), by counting the collectives' buffers.

Run: OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/comm_bytes.py configs/tiny.yaml [key=value ...]
Ring algorithms send (W-1)/W of a reduce-scatter's input and 2(W-1)/W of an all-reduce's buffer per rank.
"""

import json
import sys

import torch.distributed as dist

from lisa_dist._compat import REDUCE_SCATTER
from lisa_dist.config import load_config
from lisa_dist.distributed import init_distributed
from lisa_dist.env import read_launch_env
from lisa_dist.train import Trainer, prepare


def main() -> None:
    config = load_config(sys.argv[1], sys.argv[2:] + ["overwrite=true", "progress_bar=false"])
    env = read_launch_env()
    source, sequences, _ = prepare(config, env.world_size)
    runtime = init_distributed(env, config.engine.timeout_s)
    trainer = Trainer(config, runtime, source, sequences)
    sent = {"reduce_scatter": 0}
    original = getattr(dist, REDUCE_SCATTER)

    def counting(output, input, *args, **kwargs):
        world = dist.get_world_size(kwargs.get("group"))
        sent["reduce_scatter"] += input.numel() * input.element_size() * (world - 1) // world
        return original(output, input, *args, **kwargs)

    setattr(dist, REDUCE_SCATTER, counting)
    trainer.train_step(0)  # lazy initialization and the first switch
    sent["reduce_scatter"] = 0
    trainer.train_step(1)
    grad_elements = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    world = runtime.world_size
    if runtime.is_main:
        print(json.dumps({
            "engine": config.engine.name, "method": config.method, "optim": config.optim.name,
            "reduce_dtype": config.train.reduce_dtype, "trainable_elements": grad_elements,
            "reduce_scatter_bytes_sent_per_rank": sent["reduce_scatter"],
            "all_reduce_bf16_bytes_per_rank": 2 * (world - 1) * grad_elements * 2 // world,
            "all_reduce_fp32_bytes_per_rank": 2 * (world - 1) * grad_elements * 4 // world}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
