"""accelerate config files as users write them: each setting becomes run configuration or a clear error.

`accelerate launch --config_file F -m lisa_dist train CONFIG.yaml` starts the ranks through torchrun and
passes the file's settings as environment variables (ACCELERATE_*, FSDP_*, PARALLELISM_CONFIG_*), which
`lisa_dist.env` collects. Every variable accelerate can set is either turned into a config key here,
accepted because lisa_dist already behaves that way, or refused: none is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lisa_dist.config import ConfigError

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}
# FSDP1 names accelerate still accepts for FSDP2's reshard_after_forward.
RESHARD = {"true": True, "false": False, "FULL_SHARD": True, "SHARD_GRAD_OP": False}
BACKWARD_PREFETCH = {"BACKWARD_PRE": True, "NO_PREFETCH": False}

# What lisa_dist always does, so any value of these settings describes the same run.
ALREADY_SO = {
    "FSDP_USE_ORIG_PARAMS": "FSDP2 always trains the original parameters",
    "FSDP_SYNC_MODULE_STATES": "each rank reads only its own shards of the same weights",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "each rank reads only its own shards, never the whole model",
    "FSDP_STATE_DICT_TYPE": "checkpoints are always sharded (torch.distributed.checkpoint, reshardable) and the "
                            "final model is always a full Hugging Face directory",
    "FSDP_MIN_NUM_PARAMS": "only read with SIZE_BASED_WRAP, which is refused",
    "FSDP_SHARDING_STRATEGY": "FSDP2 reads fsdp_reshard_after_forward instead",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "the final model is always saved in train.dtype",
    "ACCELERATE_CONFIG_DS_FIELDS": "bookkeeping of accelerate",
    "ACCELERATE_DYNAMO_MODE": "only read with a dynamo backend, which is refused",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "only read with a dynamo backend, which is refused",
    "ACCELERATE_DYNAMO_USE_DYNAMIC": "only read with a dynamo backend, which is refused",
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "only read with a dynamo backend, which is refused",
    "ACCELERATE_DEBUG_MODE": "accelerate's own collective checks; lisa_dist checks rank agreement itself",
    "ACCELERATE_USE_CPU": "the device follows the machine",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "the parallelism sizes themselves are checked",
}


@dataclass(frozen=True, slots=True)
class AccelerateSettings:
    config: dict[str, Any] = field(default_factory=dict)
    """Dotted run-config keys and the values the accelerate file implies."""
    gradient_accumulation_steps: int | None = None
    """DeepSpeed's accumulation from the accelerate file, checked against the batch sizes and world size."""

    def check_world_size(self, global_batch_size: int, micro_batch_size: int, world_size: int) -> None:
        if self.gradient_accumulation_steps is None:
            return
        derived = global_batch_size // (micro_batch_size * world_size)
        if derived != self.gradient_accumulation_steps:
            raise ConfigError(
                f"accelerate config: gradient_accumulation_steps={self.gradient_accumulation_steps} contradicts "
                f"train.global_batch_size={global_batch_size}, train.micro_batch_size={micro_batch_size} on "
                f"{world_size} ranks ({derived} accumulation steps); remove it from the accelerate file")


def read_accelerate_settings(variables: Mapping[str, str]) -> AccelerateSettings:
    """Turn `accelerate launch`'s variables into run configuration; ConfigError for what lisa_dist cannot honour."""
    if not variables:
        return AccelerateSettings()
    env = dict(variables)
    config: dict[str, Any] = {}
    precision = env.pop("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in MIXED_PRECISION:
        raise _refused("mixed_precision", precision, f"lisa_dist trains in {', '.join(MIXED_PRECISION)}")
    config["train.dtype"] = MIXED_PRECISION[precision]
    dynamo = env.pop("ACCELERATE_DYNAMO_BACKEND", "NO")
    if dynamo.upper() != "NO":
        raise _refused("dynamo_config.dynamo_backend", dynamo, "lisa_dist does not compile the model")
    _refuse_parallelism(env)
    fsdp = _flag(env.pop("ACCELERATE_USE_FSDP", "false"), "distributed_type")
    deepspeed = _flag(env.pop("ACCELERATE_USE_DEEPSPEED", "false"), "distributed_type")
    accumulation = None
    if fsdp:
        config["engine.name"] = "fsdp2"
        config.update(_fsdp_settings(env))
    elif deepspeed:
        config["engine.name"] = "zero3"
        settings, accumulation = _deepspeed_settings(env)
        config.update(settings)
    if _flag(env.pop("ACCELERATE_USE_MEGATRON_LM", "false"), "distributed_type"):
        raise _refused("distributed_type", "MEGATRON_LM", "lisa_dist shards with FSDP2 or DeepSpeed ZeRO-3")
    for key in [k for k in env if k in ALREADY_SO]:
        env.pop(key)
    if env:
        key, value = next(iter(sorted(env.items())))
        raise _refused(key, value, "lisa_dist has no equivalent of this setting")
    return AccelerateSettings(config=config, gradient_accumulation_steps=accumulation)


def _fsdp_settings(env: dict[str, str]) -> dict[str, Any]:
    version = env.pop("FSDP_VERSION", "1")
    if version != "2":
        raise _refused("fsdp_config.fsdp_version", version, "lisa_dist shards with FSDP2 (fully_shard), not "
                       "FSDP1 (FullyShardedDataParallel); set fsdp_version: 2")
    config: dict[str, Any] = {}
    reshard = env.pop("FSDP_RESHARD_AFTER_FORWARD", "true")
    if reshard not in RESHARD:
        raise _refused("fsdp_config.fsdp_reshard_after_forward", reshard,
                       "lisa_dist shards every parameter over all ranks; use true or false")
    config["engine.reshard_after_forward"] = RESHARD[reshard]
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    if strategy not in RESHARD:
        raise _refused("fsdp_config.fsdp_sharding_strategy", strategy,
                       "lisa_dist shards every parameter over all ranks (no replication, no hybrid groups)")
    config["engine.offload_params"] = _flag(env.pop("FSDP_OFFLOAD_PARAMS", "false"), "fsdp_offload_params")
    checkpointing = _flag(env.pop("FSDP_ACTIVATION_CHECKPOINTING", "false"), "fsdp_activation_checkpointing")
    config["model.activation_checkpointing"] = checkpointing
    offload = _flag(env.pop("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "false"),
                    "fsdp_activation_checkpointing_offload")
    if offload and not checkpointing:
        raise _refused("fsdp_config.fsdp_activation_checkpointing_offload", "true",
                       "it needs fsdp_activation_checkpointing: true (as accelerate requires)")
    config["model.activation_offload"] = offload
    policy = env.pop("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise _refused("fsdp_config.fsdp_auto_wrap_policy", policy, "LISA freezes and trains whole decoder layers, so "
                       "lisa_dist shards one unit per decoder layer; use TRANSFORMER_BASED_WRAP")
    if "FSDP_TRANSFORMER_CLS_TO_WRAP" in env:
        classes = [c.strip() for c in env.pop("FSDP_TRANSFORMER_CLS_TO_WRAP").split(",") if c.strip()]
        if len(classes) != 1:
            raise _refused("fsdp_config.fsdp_transformer_layer_cls_to_wrap", ",".join(classes),
                           "lisa_dist wraps exactly the model's decoder layer class; name that one class")
        config["engine.layer_class"] = classes[0]
    prefetch = env.pop("FSDP_BACKWARD_PREFETCH", "BACKWARD_PRE")
    if prefetch not in BACKWARD_PREFETCH:
        raise _refused("fsdp_config.fsdp_backward_prefetch", prefetch,
                       "FSDP2 prefetches before a layer's backward or not at all; use BACKWARD_PRE or NO_PREFETCH")
    config["engine.backward_prefetch"] = BACKWARD_PREFETCH[prefetch]
    if _flag(env.pop("FSDP_FORWARD_PREFETCH", "false"), "fsdp_forward_prefetch"):
        raise _refused("fsdp_config.fsdp_forward_prefetch", "true", "FSDP2 has no forward prefetch (accelerate refuses "
                       "it for fsdp_version 2 too)")
    if env.pop("FSDP_IGNORED_MODULES", ""):
        raise _refused("fsdp_config.fsdp_ignored_modules", "set", "every parameter is sharded (LISA samples from all "
                       "decoder layers)")
    return config


def _deepspeed_settings(env: dict[str, str]) -> tuple[dict[str, Any], int | None]:
    config: dict[str, Any] = {}
    if "ACCELERATE_DEEPSPEED_CONFIG_FILE" in env:
        config["engine.deepspeed_config"] = env.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    stage = env.pop("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if stage != "3":
        raise _refused("deepspeed_config.zero_stage", stage, "lisa_dist's DeepSpeed engine is ZeRO-3")
    if not _flag(env.pop("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true"), "zero3_init_flag"):
        raise _refused("deepspeed_config.zero3_init_flag", "false", "lisa_dist always builds the model partitioned "
                       "(zero.Init), so no rank holds the whole model")
    optimizer = env.pop("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    if optimizer not in ("none", "cpu"):
        raise _refused("deepspeed_config.offload_optimizer_device", optimizer,
                       "lisa_dist offloads optimizer state to CPU memory only (optim.offload_state)")
    if optimizer == "cpu":
        config["optim.offload_state"] = True
    params = env.pop("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    if params != "none":
        raise _refused("deepspeed_config.offload_param_device", params,
                       "lisa_dist updates ZeRO-3 partitions in place on the device; use engine.name=fsdp2 with "
                       "fsdp_offload_params for parameters in CPU memory")
    if "ACCELERATE_GRADIENT_CLIPPING" in env:
        text = env.pop("ACCELERATE_GRADIENT_CLIPPING")
        if text != "none":
            config["optim.max_grad_norm"] = _number(text, "deepspeed_config.gradient_clipping")
    accumulation = None
    if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in env:
        text = env.pop("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        if text != "auto":
            accumulation = int(_number(text, "deepspeed_config.gradient_accumulation_steps"))
    return config, accumulation


def _refuse_parallelism(env: dict[str, str]) -> None:
    for key in [k for k in env if k.startswith("PARALLELISM_CONFIG_")]:
        value = env.pop(key)
        if key.endswith("_SIZE") and key != "PARALLELISM_CONFIG_DP_SHARD_SIZE" and value not in ("1", "0"):
            raise _refused(f"parallelism_config ({key})", value, "lisa_dist shards over all ranks only (no tensor, "
                           "context, sequence parallelism or replica groups)")


def _flag(value: str, name: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"accelerate config: {name}={value!r} must be true or false")


def _number(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"accelerate config: {name}={value!r} must be a number") from None


def _refused(name: str, value: str, why: str) -> ConfigError:
    return ConfigError(f"accelerate config: {name}={value} is not supported: {why}")
