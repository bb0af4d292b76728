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
from lisa_dist.validation import validate


@dataclass(kw_only=True, slots=True)
class LisaConfig:
    gamma: int = 2
    """Number of decoder layers trained in each interval (the paper's gamma)."""
    interval: int = 20
    """Optimizer steps between re-sampling the active layers (the paper's K)."""
    strategy: Literal["uniform", "weights", "outlier", "routing", "grad_norm", "cyclic"] = "uniform"
    """How the active units are drawn: `uniform` (the paper's LISA); `weights` (by lisa.layer_weights);
    `outlier` (OwLore: by each unit's share of outlier weights, measured on the first step's batches);
    `routing` (lisa.unit=expert, ESFT's affinity: an expert by its share of its layer's routed tokens, measured on
    the first step's batches; each layer's rest as under uniform);
    `grad_norm` (by a running average of each unit's gradient RMS); `cyclic` (BAdam: every unit once per
    cycle, in lisa.cyclic_order)."""
    unit: Literal["layer", "block", "expert"] = "layer"
    """What is sampled and what gamma counts: whole decoder layers, their attention and MLP blocks, or (a
    mixture-of-experts model) each layer's routed experts one by one plus the rest of each layer (attention,
    router, shared experts, norms) as one unit; optimizer state exists only for the active experts."""
    layer_weights: list[float] | None = None
    """strategy=weights: a non-negative sampling weight per unit."""
    uniform_mix: float = 0.1
    """strategy=outlier/grad_norm: the share of probability spread uniformly, so every unit keeps at
    least uniform_mix / N (in (0, 1]; 1 is uniform)."""
    grad_norm_decay: float = 0.8
    """strategy=grad_norm: the running average's weight on the previous estimate (MISA's beta)."""
    outlier_threshold: float = 13.0
    """strategy=outlier: a weight is an outlier when |W_ij| * ||X_j|| exceeds this times its unit's mean
    (OWL's M; OwLore's published ratios use 13)."""
    cyclic_order: Literal["ascending", "descending", "random"] = "random"
    """strategy=cyclic: the order of each cycle (random: a new permutation per cycle)."""
    inactive_update: Literal["none", "sgd", "signsgd", "adalomo"] = "none"
    """How the decoder units not sampled train: `none` (the paper's LISA: frozen), or inside backward by a rule
    that keeps no state (SGD, signSGD; AdaLomo with its small factored statistics), each gradient freed as soon
    as it is used. Backward then runs through every layer, as in full fine-tuning; optimizer state and fp32
    masters stay the active units' only. Needs a post-backward optimizer (optim.name adamw or sgd)."""
    inactive_lr: float | None = None
    """lisa.inactive_update's learning rate, scheduled as optim.lr is; None: optim.lr times the rule's factor
    (`optim.rules.INACTIVE_LR_FACTOR`)."""
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
    experts_implementation: Literal["auto", "grouped_mm", "eager"] = "auto"
    """Mixture-of-experts models: how transformers computes the routed experts. `grouped_mm`: grouped matrix
    products over the tokens sorted by expert, no host sync; `eager`: a loop over the experts the batch reaches,
    reading each one's tokens on the host. `auto`: grouped_mm wherever the model can switch (docs/models.md
    times both)."""
    router_aux_loss_coef: float | None = None
    """Mixture-of-experts models: the weight of the router's load-balancing loss added to the token loss (0
    turns it off). Default: the model config's `router_aux_loss_coef` when its `output_router_logits` is true,
    else off."""
    freeze_routers: bool = False
    """Mixture-of-experts models: keep every layer's router frozen, also while its layer trains."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = ""
    """Training data: a JSON-lines or JSON file, a parquet file, or a `datasets.save_to_disk` directory."""
    format: Literal["auto", "alpaca", "chat", "sharegpt", "text"] = "auto"
    """Record format: `alpaca` (instruction/input/output), `chat` (messages with role/content), `sharegpt`
    (conversations with from/value), `text` (loss on every token); `auto` decides from the first record."""
    fields: dict[str, str] | None = None
    """Where a format's keys are in your records, e.g. {instruction: q, output: a}."""
    seq_len: int = 512
    """Tokens per training sequence."""
    pack: bool = False
    """Concatenate examples into full sequences instead of padding each one."""
    eval_path: str | None = None
    """Held-out data for evaluation, in any form `path` takes (the same format and fields)."""
    eval_fraction: float = 0.0
    """Hold out this fraction of `path`'s examples for evaluation instead (a split fixed by the seed, the same
    for any world size)."""
    cache_dir: str | None = None
    """Where tokenized data is kept between runs, keyed by the data and the tokenizer; default
    OUTPUT_DIR/data_cache."""


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
    """Round fp32 updates into bf16 parameters stochastically (lomo/adalomo write into bf16 directly;
    lisa.inactive_update's updates in bf16 always are)."""
    adalomo_eps: list[float] = field(default_factory=lambda: [1e-30, 1e-3])
    """AdaLomo (eps1 added to squared gradients, eps2 floor of the parameter RMS in the relative step); also
    lisa.inactive_update=adalomo's, as are the two below."""
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
class PreemptConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that ask the run to stop: every rank finishes its step, they agree on it, write a checkpoint
    and exit with preempt.exit_code (SLURM's `--signal`, Kubernetes' SIGTERM before the kill). [] leaves
    each signal's default action: the process dies and resumes from the last periodic checkpoint."""
    exit_code: int = 75
    """The exit status after a preemption checkpoint: 75 (EX_TEMPFAIL, "try again"); launch/slurm.sbatch
    requeues the job on it."""


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Experiment trackers rank 0 writes to: `tensorboard` (OUTPUT_DIR/tensorboard) and `wandb` (offline
    when WANDB_MODE=offline). Each needs its extra: pip install 'lisa_dist[tensorboard]' or '[wandb]'."""
    wandb_project: str = "lisa_dist"
    """The W&B project of the run."""
    log_every: int = 10
    """Without a terminal (SLURM, nohup), rank 0 prints a progress line every this many steps and at the end."""


@dataclass(kw_only=True, slots=True)
class Config:
    seed: int = 0
    """Seeds the layer schedule, the data order, random initialization and what the model draws in training
    (dropout: from the seed, the step and the rank, so a resumed run draws as the uninterrupted one)."""
    max_steps: int = 100
    """Optimizer steps to run."""
    output_dir: str = "runs/default"
    """Where metrics, checkpoints and the final model go."""
    save_every: int = 0
    """Write a sharded checkpoint every this many steps; 0 saves only the final model."""
    save_total_limit: int = 0
    """Keep only the newest this many step checkpoints (older ones are deleted once a newer one is
    complete); 0 keeps all."""
    save_errors: Literal["stop", "continue"] = "stop"
    """A step checkpoint that cannot be written (a full disk, an I/O error, a quota): `stop` ends the run with
    an error naming the file and the space a checkpoint needs; `continue` prints it, keeps training and
    tries again at the next save. Either way the checkpoints written before stay whole."""
    async_save: bool = False
    """Write step checkpoints in the background: each rank copies its shards to host memory (as much host
    memory as its share of a checkpoint), training goes on while a thread writes them, and the checkpoint is
    published at the next save or at the end of the run. A kill before then leaves the previous checkpoint.
    It pays where the host's cores are idle during a step (an accelerator's); on CPU training the writer shares
    the cores and the run is no faster (docs/reliability.md)."""
    method: Literal["lisa", "full"] = "lisa"
    """`lisa` trains gamma sampled decoder layers per interval; `full` trains them all."""
    resume: str | None = None
    """`auto` continues from the newest complete checkpoint in output_dir; or a checkpoint directory."""
    overwrite: bool = False
    """Replace an earlier run's metrics, checkpoints and final model in output_dir (fresh runs only)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 when attached to a terminal."""
    eval_every: int = 0
    """Evaluate on the held-out data (data.eval_path or data.eval_fraction) every this many optimizer steps;
    0 evaluates only at the end."""
    eval_max_batches: int = 0
    """Evaluate on at most this many global batches (train.global_batch_size sequences each); 0 uses all."""
    lisa: LisaConfig = field(default_factory=LisaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)

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
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
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
        raise ConfigError(f"unknown config key {prefix}{key}{hint}; "
                          f"allowed keys: {', '.join(prefix + n for n in names)}")
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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(args[0], k, f"{key} key"): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
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


