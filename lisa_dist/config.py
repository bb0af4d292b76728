"""Typed run configuration: YAML plus dotted overrides, validated before any process group starts."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lisa_dist.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class LisaConfig:
    gamma: int = 2
    """Number of decoder layers trained in each interval (the paper's gamma)."""
    interval: int = 20
    """Optimizer steps between re-sampling the active layers (the paper's K)."""
    layer_weights: list[float] | None = None
    """Optional non-negative sampling weight per decoder layer; uniform when unset."""
    train_embeddings: bool = True
    """Keep the input embeddings (and position embeddings) trainable at every step."""
    train_norm: bool = True
    """Keep the final norm trainable at every step."""
    train_head: bool = True
    """Keep the LM head trainable at every step."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    path: str | None = None
    """A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)."""
    preset: str | None = None
    """A named architecture built with random weights (see `lisa_dist.models.presets`)."""
    config: str | None = None
    """A config.json (or a directory holding one) built with random weights."""
    num_layers: int | None = None
    """Keep only the first N decoder layers of a preset or config: a shallow model of the same shape, for
    tests and memory planning. Not with model.path (the checkpoint holds all layers)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`, else the bundled tiny tokenizer."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    activation_offload: bool = False
    """Move tensors saved for backward (with checkpointing: each layer's input) to pinned host memory in
    forward and back in backward. Costs two host-device copies of each per step."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel passed to transformers."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = ""
    """A local JSONL file in Alpaca (instruction/input/output) or chat (messages) format."""
    format: Literal["auto", "alpaca", "chat"] = "auto"
    """Record format; `auto` decides from the first record's keys."""
    seq_len: int = 512
    """Tokens per training sequence."""
    pack: bool = False
    """Concatenate examples into full sequences instead of padding each one."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks; independent of the world size."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one rank; the rest is gradient accumulation."""
    dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
    """Storage and compute dtype of the parameters; bf16/fp16 keep fp32 masters of active shards (adamw, sgd)."""
    loss_chunk_tokens: int = 0
    """Compute the LM head and loss over chunks of this many tokens, recomputing each chunk's logits in
    backward (saves the full-vocabulary logits; costs one more head matmul). 0 = in one piece."""
    reduce_dtype: Literal["fp32", "param"] = "fp32"
    """Gradient reduce-scatter precision: fp32, or the parameter dtype (half the bytes for bf16)."""
    loss_scale: float = 65536.0
    """fp16 only: initial dynamic loss scale."""
    loss_scale_window: int = 1000
    """fp16 only: consecutive finite steps before the loss scale doubles."""
    min_loss_scale: float = 1.0
    """fp16 only: the run stops with an error if overflows push the scale below this."""
    max_consecutive_skips: int = 20
    """Stop the run with an error after this many steps in a row were skipped for a non-finite loss or
    gradient (fp16 overflows count too: the default scale needs 16 to fall to 1); 0 never stops."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: Literal["adamw", "sgd", "lomo", "adalomo"] = "adamw"
    """`adamw`/`sgd` update after backward; `lomo`/`adalomo` update each shard inside backward (fused)."""
    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 decay (SGD), applied to trainable parameters only."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping. Fused optimizers use the norm of
    the previous step (one-step lag) unless `fused_precheck` computes this step's norm first."""
    clip_grad_value: float = 0.0
    """Clamp every gradient element to [-v, v] before the update; 0 disables it."""
    fused_precheck: bool | None = None
    """lomo/adalomo: run a first backward that only checks gradients (non-finite values, exact global norm)
    before the backward that applies updates. Doubles backward time; default on for fp16, off otherwise."""
    offload_state: bool = False
    """Keep optimizer state and fp32 masters in pinned host memory; each shard's state visits the device
    only for its own update (one shard's state on the card at a time, two copies of it per step)."""
    stochastic_rounding: bool = False
    """Round fp32 updates into bf16 parameters stochastically (lomo/adalomo write into bf16 directly)."""
    adalomo_eps: list[float] = field(default_factory=lambda: [1e-30, 1e-3])
    """AdaLomo (eps1 added to squared gradients, eps2 floor of the parameter RMS in the relative step)."""
    adalomo_decay_rate: float = -0.8
    """AdaLomo second-moment decay: beta2_t = 1 - t ** decay_rate."""
    adalomo_clip_threshold: float = 1.0
    """AdaLomo grouped update normalization: each parameter's update RMS is capped at this value."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.0
    """SGD momentum; 0 keeps no optimizer state."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to `lr`."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate decay after warm-up, down to `min_lr_ratio * lr` at `max_steps`."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr` for decaying schedules."""


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    name: Literal["fsdp2", "zero3"] = "fsdp2"
    """Sharding engine: PyTorch FSDP2 (`fully_shard`) or DeepSpeed ZeRO-3 partitioning."""
    deepspeed_config: str | None = None
    """zero3: a DeepSpeed JSON file as users write it; lisa_dist fills in batch sizes and precision."""
    reshard_after_forward: bool = True
    """Free each layer's gathered parameters after forward (ZeRO-3 style) rather than keep them."""
    split_layers: bool = False
    """fsdp2: shard each decoder layer's attention and MLP blocks as separate units (smaller peak buffers,
    more collectives)."""
    backward_prefetch: bool = True
    """fsdp2: gather the next decoder layer while the current one runs backward (faster; one more
    layer of gathered parameters alive at the peak)."""
    offload_params: bool = False
    """fsdp2: keep parameter shards, their gradients and the optimizer update in CPU memory (FSDP2's
    CPUOffloadPolicy); each unit is copied to the device for its forward and backward."""
    layer_class: str | None = None
    """The decoder layer class the run expects each layer unit to be (accelerate's
    fsdp_transformer_layer_cls_to_wrap); the run stops before starting if the model's layers differ."""
    timeout_s: int = 600
    """Collective timeout; a dead peer ends the job after this many seconds."""


@dataclass(kw_only=True, slots=True)
class Config:
    seed: int = 0
    """Seeds the layer schedule, the data order and random initialization."""
    max_steps: int = 100
    """Optimizer steps to run."""
    output_dir: str = "runs/default"
    """Where metrics, checkpoints and the final model go."""
    save_every: int = 0
    """Write a sharded checkpoint every this many steps; 0 saves only the final model."""
    save_total_limit: int = 0
    """Keep only the newest this many step checkpoints (older ones are deleted once a newer one is
    complete); 0 keeps all."""
    method: Literal["lisa", "full"] = "lisa"
    """`lisa` trains gamma sampled decoder layers per interval; `full` trains them all."""
    resume: str | None = None
    """`auto` continues from the newest complete checkpoint in output_dir; or a checkpoint directory."""
    overwrite: bool = False
    """Replace an earlier run's metrics, checkpoints and final model in output_dir (fresh runs only)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 when attached to a terminal."""
    lisa: LisaConfig = field(default_factory=LisaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] = (), implied: Mapping[str, Any] | None = None,
                implied_by: str = "the launcher") -> Config:
    """Read YAML, apply `dotted.key=value` overrides, build and validate the typed config.

    `implied` holds dotted keys a launcher's own configuration sets (an accelerate config file); they fill
    keys the YAML and overrides leave unset, and a different explicit value is an error naming both."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    if implied:
        apply_implied(raw, implied, implied_by)
    config = from_dict(raw)
    validate(config)
    return config


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, prefix="")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    value = yaml.safe_load(text) if text else ""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_implied(raw: dict[str, Any], implied: Mapping[str, Any], implied_by: str) -> None:
    explicit = from_dict(raw)
    for key, value in implied.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        if name in node:
            current = explicit
            for part in key.split("."):
                current = getattr(current, part)
            if current != value:
                raise ConfigError(f"{implied_by} sets {key}={value!r} but the run config sets {key}={current!r}; "
                                  "remove one of them")
        node[name] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix}{key}{hint}; allowed keys: {', '.join(prefix + n for n in names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _at_least(key: str, value: float, low: float, note: str = "") -> None:
    _require(value >= low, f"{key} must be >= {low}{note}, got {value}")


def validate(c: Config) -> None:
    """Checks that need no model or process group; model-dependent ones live in `models`."""
    _at_least("max_steps", c.max_steps, 1)
    _at_least("save_every", c.save_every, 0, " (0 = final model only)")
    _at_least("save_total_limit", c.save_total_limit, 0, " (0 keeps all)")
    _require(bool(c.output_dir), "output_dir must not be empty")
    sources = [f"model.{k}" for k in ("path", "preset", "config") if getattr(c.model, k)]
    _require(len(sources) == 1, "set exactly one of model.path, model.preset, model.config; "
                                f"got {', '.join(sources) or 'none'}")
    if c.model.num_layers is not None:
        _at_least("model.num_layers", c.model.num_layers, 1)
        _require(not c.model.path, "model.num_layers shortens a preset or config; a model.path checkpoint "
                                   "holds all its layers (unset one of them)")
    _require(bool(c.data.path), "data.path must name a JSONL file")
    _require(Path(c.data.path).is_file(), f"data.path: file not found: {c.data.path}")
    _at_least("data.seq_len", c.data.seq_len, 2)
    validate_training(c)


def validate_training(c: Config) -> None:
    """The checks of the method, engine, batch, precision and optimizer (also for runs whose model and data
    come from elsewhere: the Hugging Face Trainer integration)."""
    _at_least("engine.timeout_s", c.engine.timeout_s, 1)
    _validate_engine(c.engine)
    _validate_lisa(c.lisa)
    _validate_train(c.train)
    _validate_optim(c.optim, c.train)


# Engine options only one engine has, with the value the other engine always behaves as.
_FSDP2_ONLY = {"offload_params": False, "split_layers": False, "backward_prefetch": True, "reshard_after_forward": True}


def _validate_engine(e: EngineConfig) -> None:
    """An option the chosen engine does not have is refused, never ignored."""
    if e.name == "zero3":
        for key, behaviour in _FSDP2_ONLY.items():
            value = getattr(e, key)
            _require(value == behaviour, f"engine.{key}={str(value).lower()} applies to engine.name=fsdp2; ZeRO-3 "
                                         f"always runs as engine.{key}={str(behaviour).lower()} (prefetching and "
                                         "partitioning follow the DeepSpeed config)")
    else:
        _require(e.deepspeed_config is None, f"engine.deepspeed_config={e.deepspeed_config} applies to "
                                             f"engine.name=zero3, not {e.name}")


def _validate_lisa(lisa: LisaConfig) -> None:
    _at_least("lisa.gamma", lisa.gamma, 1)
    _at_least("lisa.interval", lisa.interval, 1)
    weights = lisa.layer_weights
    if weights is not None:
        _require(all(0 <= w < float("inf") for w in weights), f"lisa.layer_weights must be finite and >= 0, got {weights}")
        positive = sum(w > 0 for w in weights)
        _require(positive >= lisa.gamma,
                 f"lisa.layer_weights has {positive} positive weights, fewer than lisa.gamma={lisa.gamma}")


def _validate_train(t: TrainConfig) -> None:
    _at_least("train.global_batch_size", t.global_batch_size, 1)
    _at_least("train.micro_batch_size", t.micro_batch_size, 1)
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"train.global_batch_size={t.global_batch_size} is not divisible by "
             f"train.micro_batch_size={t.micro_batch_size}")
    _require(t.loss_scale > 0 and t.min_loss_scale > 0, "train.loss_scale and train.min_loss_scale must be > 0")
    _at_least("train.loss_scale_window", t.loss_scale_window, 1)
    _at_least("train.max_consecutive_skips", t.max_consecutive_skips, 0, " (0 never stops)")
    _at_least("train.loss_chunk_tokens", t.loss_chunk_tokens, 0, " (0 = no chunking)")


def _validate_optim(o: OptimConfig, t: TrainConfig) -> None:
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _at_least("optim.max_grad_norm", o.max_grad_norm, 0, " (0 disables clipping)")
    _at_least("optim.clip_grad_value", o.clip_grad_value, 0, " (0 disables it)")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _require(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _require(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    fused = o.name in ("lomo", "adalomo")
    _require(not (o.name == "lomo" and o.momentum), f"optim.momentum={o.momentum} with optim.name=lomo: "
                                                    "LOMO keeps no optimizer state; use sgd for momentum")
    _require(not o.stochastic_rounding or t.dtype == "bf16",
             f"optim.stochastic_rounding needs train.dtype=bf16, got {t.dtype}")
    _require(not (fused and t.dtype == "fp16" and o.fused_precheck is False),
             "train.dtype=fp16 with a fused optimizer needs optim.fused_precheck: an overflow found after some "
             "updates were applied could not be undone")
    _require(fused or o.fused_precheck is None, f"optim.fused_precheck applies to lomo and adalomo, not {o.name}")
    _require(len(o.adalomo_eps) == 2 and all(e > 0 for e in o.adalomo_eps),
             f"optim.adalomo_eps must be two positive numbers, got {o.adalomo_eps}")
    _require(o.adalomo_decay_rate < 0, f"optim.adalomo_decay_rate must be < 0, got {o.adalomo_decay_rate}")
    _require(o.adalomo_clip_threshold > 0, f"optim.adalomo_clip_threshold must be > 0, got {o.adalomo_clip_threshold}")


def check_world_size(c: Config, world_size: int) -> None:
    _at_least("world size", world_size, 1)
    per_step = c.train.micro_batch_size * world_size
    _require(c.train.global_batch_size % per_step == 0,
             f"train.global_batch_size={c.train.global_batch_size} is not divisible by "
             f"train.micro_batch_size={c.train.micro_batch_size} x world size {world_size}")
    accumulation = c.train.global_batch_size // per_step
    _require(not (c.method == "full" and c.optim.name in ("lomo", "adalomo") and accumulation > 1),
             f"method=full with optim.name={c.optim.name} applies each update during backward and keeps no "
             f"gradients, but train.global_batch_size={c.train.global_batch_size} over micro-batches of "
             f"{c.train.micro_batch_size} on {world_size} ranks needs {accumulation} accumulation steps, "
             f"which would keep every gradient; set train.micro_batch_size="
             f"{c.train.global_batch_size // world_size} or use method=lisa")
