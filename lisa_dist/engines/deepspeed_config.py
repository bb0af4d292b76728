"""DeepSpeed JSON files as users write them: lisa_dist fills in what it owns and refuses contradictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lisa_dist.config import Config, ConfigError

DEFAULT_ZERO3: dict[str, Any] = {"zero_optimization": {"stage": 3}}


def load_deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config this run uses; raises ConfigError naming the key that contradicts lisa_dist."""
    path = config.engine.deepspeed_config
    if path is None:
        ds = json.loads(json.dumps(DEFAULT_ZERO3))
        where = "the default ZeRO-3 config"
    else:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"engine.deepspeed_config: file not found: {file}")
        try:
            ds = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"engine.deepspeed_config: {file} is not valid JSON: {e}") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"engine.deepspeed_config: {file} must hold a JSON object")
        where = str(file)
    _refuse_owned_blocks(ds, where, config)
    _check_zero(ds, where)
    _fill_batch(ds, where, config, world_size)
    _fill_precision(ds, where, config)
    return ds


def _refuse_owned_blocks(ds: dict[str, Any], where: str, config: Config) -> None:
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{where}: remove the '{key}' block: lisa_dist owns the optimizer and learning-rate "
                              f"schedule (optim.name={config.optim.name}, optim.lr, optim.schedule)")
    if "gradient_clipping" in ds and ds["gradient_clipping"] != config.optim.max_grad_norm:
        raise ConfigError(f"{where}: gradient_clipping={ds['gradient_clipping']} contradicts optim.max_grad_norm="
                          f"{config.optim.max_grad_norm}; set optim.max_grad_norm instead")


def _check_zero(ds: dict[str, Any], where: str) -> None:
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object")
    if zero.get("stage", 3) != 3:
        raise ConfigError(f"{where}: zero_optimization.stage={zero['stage']}: engine.name=zero3 needs stage 3")
    zero["stage"] = 3
    if zero.get("zero_hpz_partition_size", 1) not in (0, 1):
        raise ConfigError(f"{where}: zero_optimization.zero_hpz_partition_size={zero['zero_hpz_partition_size']}: "
                          "hpZ secondary partitions are not supported by lisa_dist's ZeRO-3 engine")
    if zero.get("mics_shard_size", -1) not in (-1, 0):
        raise ConfigError(f"{where}: zero_optimization.mics_shard_size={zero['mics_shard_size']}: MiCS partition "
                          "layouts are not supported by lisa_dist's ZeRO-3 engine")
    if "offload_optimizer" in zero and zero["offload_optimizer"].get("device", "none") != "none":
        raise ConfigError(f"{where}: zero_optimization.offload_optimizer: lisa_dist owns the optimizer state and "
                          "does not offload it yet; remove the block")
    size = zero.get("reduce_bucket_size", "auto")
    whole = isinstance(size, (int, float)) and not isinstance(size, bool) and size >= 1 and float(size).is_integer()
    if size != "auto" and not whole:
        raise ConfigError(f"{where}: zero_optimization.reduce_bucket_size={size!r}: lisa_dist reduce-scatters each "
                          "unit's gradients in buckets of at most this many elements; give a positive whole number, "
                          "or \"auto\" for the largest decoder-layer parameter's size")
    if whole:
        zero["reduce_bucket_size"] = int(size)
    else:  # "auto": the engine's default; DeepSpeed itself would refuse the string and has no use for it here
        zero.pop("reduce_bucket_size", None)
    # DeepSpeed's global F.linear replacement would also reach code outside the model.
    zero.setdefault("memory_efficient_linear", False)


def _fill_batch(ds: dict[str, Any], where: str, config: Config, world_size: int) -> None:
    t = config.train
    owned = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
             "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size)}
    for key, value in owned.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{where}: {key}={ds[key]} contradicts train.global_batch_size={t.global_batch_size}, "
                              f"train.micro_batch_size={t.micro_batch_size} on {world_size} ranks ({key} = {value}); "
                              "remove it or set it to \"auto\"")
        ds[key] = value


def _fill_precision(ds: dict[str, Any], where: str, config: Config) -> None:
    dtype = config.train.dtype
    for key, wanted in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        block = ds.get(key, {})
        enabled = block.get("enabled", False) if isinstance(block, dict) else False
        if key in ds and enabled not in ("auto", wanted):
            raise ConfigError(f"{where}: {key}.enabled={enabled} contradicts train.dtype={dtype}")
        ds[key] = {"enabled": wanted}
