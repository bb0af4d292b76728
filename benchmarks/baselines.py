"""The baselines of `benchmarks/speed_memory.py`, written as their own users write them: plain FSDP2
(`fully_shard` per decoder layer, `torch.optim.AdamW`) and DeepSpeed ZeRO-3 with its own optimizer
(`deepspeed.initialize`, AdamW). The same model, data order, loss and accounting as lisa_dist's runs:
lisa_dist's config loader, data pipeline and token loss, and its StorageTracker on CPU (the CUDA
allocator's peak on GPU).

Usage: torchrun --nproc_per_node 2 -m benchmarks.baselines {fsdp2_adamw|zero3_adamw} CONFIG.yaml OUT.json
       [key=value ...]
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lisa_dist.config import Config, load_config
from lisa_dist.data import GlobalBatches
from lisa_dist.distributed import init_distributed
from lisa_dist.env import read_launch_env
from lisa_dist.loss import loss_sum
from lisa_dist.sizing.memory import StorageTracker
from lisa_dist.models.build import DTYPES
from lisa_dist.train import prepare


def _check(config: Config, name: str) -> None:
    """What the baselines do not do is refused, not silently left out."""
    unsupported = {"train.dtype=fp16 (no loss scaling here)": config.train.dtype == "fp16",
                   "model.activation_checkpointing": config.model.activation_checkpointing,
                   "model.activation_offload": config.model.activation_offload,
                   "train.loss_chunk_tokens": bool(config.train.loss_chunk_tokens),
                   "optim.schedule / optim.warmup_steps (the baselines keep lr constant)":
                       config.optim.schedule != "constant" or config.optim.warmup_steps > 0,
                   "train.reduce_dtype=param (DeepSpeed's baseline reduces as DeepSpeed chooses)":
                       name == "zero3_adamw" and config.train.reduce_dtype != "fp32"}
    named = [key for key, on in unsupported.items() if on]
    if named:
        raise SystemExit(f"benchmarks.baselines: {', '.join(named)} not supported by the baselines; leave it at "
                         "its default or compare with --runs lisa_dist_* only")


def _model(config: Config, hf_config: transformers.PretrainedConfig, device: torch.device,
           dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    hf_config._attn_implementation = config.model.attn_implementation
    with device:
        return transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _fsdp2_adamw(config: Config, hf_config, device: torch.device):
    # fp32 parameters (AdamW's masters) computed in the training dtype: FSDP2's mixed-precision recipe
    model = _model(config, hf_config, device, torch.float32)
    dtype = DTYPES[config.train.dtype]
    policy = MixedPrecisionPolicy(param_dtype=dtype,
                                  reduce_dtype=torch.float32 if config.train.reduce_dtype == "fp32" else dtype)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)

    def backward_and_step(loss: torch.Tensor) -> None:
        loss.backward()
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def resident() -> list[torch.Tensor]:
        return [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values()
                                       if isinstance(t, torch.Tensor))]

    return model, backward_and_step, resident


def _zero3_adamw(config: Config, hf_config, device: torch.device):
    import deepspeed

    o, t = config.optim, config.train
    ds_config = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
                 "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dist.get_world_size()),
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": t.dtype == "bf16"},
                 "gradient_clipping": o.max_grad_norm,
                 "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                           "weight_decay": o.weight_decay, "torch_adam": True}}}
    _model(config, hf_config, torch.device("meta"), torch.float32)  # model code imported outside zero.Init
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # the dtype from the config's bf16 block
        model = _model(config, hf_config, device, torch.float32)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())

    def backward_and_step(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalized over the global batch
        engine.step()

    def resident() -> list[torch.Tensor]:
        optimizer = engine.optimizer
        flat = [*getattr(optimizer, "fp16_partitioned_groups_flat", []),
                *getattr(optimizer, "fp32_partitioned_groups_flat", [])]
        state = [t for s in optimizer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        # with contiguous_gradients (its default) the gradient bucket of reduce_bucket_size elements
        buckets = [b.buffer for b in getattr(optimizer, "ipg_buckets", {}).values()
                   if getattr(b, "buffer", None) is not None]
        return [p.ds_tensor for p in model.parameters()] + flat + state + buckets

    return engine, backward_and_step, resident


BASELINES = {"fsdp2_adamw": _fsdp2_adamw, "zero3_adamw": _zero3_adamw}


def main(argv: list[str]) -> None:
    name, config_path, out = argv[0], argv[1], Path(argv[2])
    config = load_config(config_path, argv[3:])
    _check(config, name)
    env = read_launch_env()
    source, sequences, _ = prepare(config, env.world_size)
    runtime = init_distributed(env, config.engine.timeout_s)
    if name == "zero3_adamw":
        from lisa_dist._compat import init_deepspeed_distributed

        init_deepspeed_distributed()
    model, backward_and_step, resident = BASELINES[name](config, source.hf_config, runtime.device)
    batches = GlobalBatches(sequences, config.train.global_batch_size, config.train.micro_batch_size,
                            runtime.rank, runtime.world_size, config.seed)
    records = []
    for step in range(config.max_steps):
        micro_batches = batches.micro_batches(step)
        targets = torch.tensor([float(sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches))])
        dist.all_reduce(targets)
        tracker = StorageTracker() if runtime.device.type == "cpu" else None
        if tracker is None:
            torch.cuda.reset_peak_memory_stats(runtime.device)
        else:
            tracker.track(resident())
            tracker.reset_peak()
        start = time.perf_counter()
        total = 0.0
        with tracker if tracker is not None else contextlib.nullcontext():
            for i, batch in enumerate(micro_batches):
                summed = loss_sum(model, None, batch, 0, runtime.device)
                total += summed.item()
                loss = summed * (runtime.world_size / targets.item())
                if name == "zero3_adamw" or i == len(micro_batches) - 1:
                    backward_and_step(loss)
                else:
                    loss.backward()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        seconds = time.perf_counter() - start
        peak = tracker.peak if tracker is not None else torch.cuda.max_memory_allocated(runtime.device)
        peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(runtime.world_size)]
        dist.all_gather(peaks, torch.tensor([float(peak)], dtype=torch.float64))
        total_loss = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(total_loss)  # the mean token loss over the global batch, as lisa-dist train logs it
        records.append({"step": step + 1, "loss": total_loss.item() / targets.item(), "step_time_s": seconds,
                        "peak_mem_gib": max(p.item() for p in peaks) / (1 << 30)})
    if runtime.rank == 0:
        out.write_text(json.dumps({"name": name, "records": records,
                                   "median_step_s": statistics.median(r["step_time_s"] for r in records[1:])}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
