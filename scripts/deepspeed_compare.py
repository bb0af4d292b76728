"""`lisa-dist plan` for ZeRO-3 full + AdamW against DeepSpeed's `estimate_zero3_model_states_mem_needs`
(the function behind `estimate_zero3_model_states_mem_needs_all_live`), without offload (docs/plan.md).

Usage: .venv/bin/python scripts/deepspeed_compare.py
"""

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from lisa_dist.config import load_config
from lisa_dist.sizing.memory import GIB
from lisa_dist.sizing.plan import ModelShape, plan_memory

print("| preset | ranks | DeepSpeed model states GiB | plan model states GiB | plan peak GiB | "
      "DeepSpeed / plan states |")
print("| --- | --- | --- | --- | --- | --- |")
for preset in ("llama2-7b", "llama2-13b", "llama2-70b"):
    for world in (8, 64):
        config = load_config("configs/tiny.yaml", ["model.path=null", f"model.preset={preset}", "engine.name=zero3",
                                                   "method=full", "optim.name=adamw", "train.dtype=bf16",
                                                   f"train.global_batch_size={world}", "train.micro_batch_size=1",
                                                   "data.seq_len=2048", "model.activation_checkpointing=true"])
        shape = ModelShape.of(config)
        memory = plan_memory(config, shape, world)
        # model states: parameter and gradient shards, optimizer state with masters, one layer gathered
        states = (memory["sharded_params"] + memory["optimizer_state"] + shape.total * 2 / world
                  + max(shape.layers) * 2)
        _, deepspeed, _ = estimate_zero3_model_states_mem_needs(
            shape.total, shape.largest_param, num_gpus_per_node=8, num_nodes=world // 8,
            cpu_offload=False, cpu_offload_params=False)
        print(f"| {preset} | {world} | {deepspeed / GIB:.2f} | {states / GIB:.2f} | {memory['peak'] / GIB:.2f} "
              f"| {deepspeed / states:.3f} |")
