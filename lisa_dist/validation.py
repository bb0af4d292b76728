"""The checks of a run configuration that need no model, data file contents or process group (those that
do live with the model and data code). Each error names the key and what it allows."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from lisa_dist.errors import ConfigError
from lisa_dist.extras import require_extra

if TYPE_CHECKING:
    from lisa_dist.config import Config, EngineConfig, LisaConfig, OptimConfig, PreemptConfig, TrainConfig


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
    _validate_data(c)
    validate_training(c)
    validate_preempt(c.preempt)


# Signals no process can catch.
UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def validate_preempt(p: PreemptConfig) -> None:
    for name in p.signals:
        _require(isinstance(name, str) and name.startswith("SIG") and isinstance(getattr(signal, name, None),
                                                                                 signal.Signals),
                 f"preempt.signals: {name!r} is not a signal name (say SIGTERM, SIGUSR1)")
        _require(name not in UNCATCHABLE, f"preempt.signals: {name} cannot be caught by a process")
    _require(len(set(p.signals)) == len(p.signals), f"preempt.signals lists a signal twice: {p.signals}")
    _require(3 <= p.exit_code <= 125, f"preempt.exit_code must be in [3, 125] (0 is success, 1 and 2 are "
                                      f"lisa-dist's errors, above 125 the shell's), got {p.exit_code}")


# The keys of each record format (`lisa_dist.data.formats`) that data.fields may point elsewhere; kept here
# so that loading a config imports no data code.
FIELD_KEYS = ("instruction", "input", "output", "messages", "conversations", "system", "text")


def _validate_data(c: Config) -> None:
    d = c.data
    _require(bool(d.path), "data.path must name a data file or a datasets.save_to_disk directory")
    for key, path in (("data.path", d.path), ("data.eval_path", d.eval_path)):
        _require(path is None or Path(path).exists(), f"{key}: file not found: {path}")
        if path is not None and (Path(path).is_dir() or Path(path).suffix == ".parquet"):
            require_extra("datasets", f"{key}={path} (parquet or a datasets.save_to_disk directory)")
    _at_least("data.seq_len", d.seq_len, 2)
    _require(0 <= d.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    _require(not (d.eval_path and d.eval_fraction), "set one of data.eval_path and data.eval_fraction, not both")
    unknown = sorted(set(d.fields or ()) - set(FIELD_KEYS))
    _require(not unknown, f"data.fields: unknown key {', '.join(unknown)}; a format's keys are {', '.join(FIELD_KEYS)}")
    _at_least("eval_every", c.eval_every, 0, " (0 = only at the end)")
    _at_least("eval_max_batches", c.eval_max_batches, 0, " (0 = all)")
    has_eval = bool(d.eval_path or d.eval_fraction)
    for key in ("eval_every", "eval_max_batches"):
        _require(has_eval or not getattr(c, key), f"{key}={getattr(c, key)} needs held-out data: set data.eval_path "
                                                  "or data.eval_fraction")
    _at_least("logging.log_every", c.logging.log_every, 1)
    _require(len(set(c.logging.report_to)) == len(c.logging.report_to),
             f"logging.report_to lists a tracker twice: {c.logging.report_to}")


def validate_training(c: Config) -> None:
    """The checks of the method, engine, batch, precision and optimizer (also for runs whose model and data
    come from elsewhere: the Hugging Face Trainer integration)."""
    _at_least("engine.timeout_s", c.engine.timeout_s, 1)
    _validate_engine(c.engine)
    _validate_lisa(c.lisa)
    for key, default in (("strategy", "uniform"), ("unit", "layer"), ("inactive_update", "none")):
        value = getattr(c.lisa, key)
        _require(c.method == "lisa" or value == default,
                 f"lisa.{key}={value} chooses what method=lisa trains; method=full trains every layer")
    _validate_inactive_update(c)
    _validate_train(c.train)
    _validate_optim(c.optim, c.train)


def _validate_inactive_update(c: Config) -> None:
    lisa = c.lisa
    _require(lisa.inactive_lr is None or lisa.inactive_update != "none",
             f"lisa.inactive_lr={lisa.inactive_lr} is the rate of lisa.inactive_update, which is none; set "
             "lisa.inactive_update: sgd, signsgd or adalomo, or drop lisa.inactive_lr")
    if lisa.inactive_update == "none":
        return
    _require(lisa.inactive_lr is None or (lisa.inactive_lr > 0 and math.isfinite(lisa.inactive_lr)),
             f"lisa.inactive_lr must be a positive number, got {lisa.inactive_lr}")
    _require(c.optim.name in ("adamw", "sgd"),
             f"lisa.inactive_update={lisa.inactive_update} updates the units not sampled inside backward beside a "
             f"post-backward optimizer for the sampled ones; optim.name={c.optim.name} already updates every "
             "trained unit inside backward: use optim.name adamw or sgd, or method=full")
    _require(lisa.unit != "expert",
             f"lisa.inactive_update={lisa.inactive_update} with lisa.unit=expert is not supported: an expert's "
             "unsampled neighbours share its stacked parameters; use lisa.unit layer or block")
    _require(c.train.dtype != "fp16",
             f"lisa.inactive_update={lisa.inactive_update} with train.dtype=fp16: fp16's loss scaling skips a whole "
             "step on an overflow, which updates applied inside backward cannot undo; use train.dtype bf16 or fp32")


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


# Each strategy option with its default, and the strategy that reads it.
_STRATEGY_OPTIONS = {"layer_weights": (None, "weights"), "uniform_mix": (0.1, ("outlier", "routing", "grad_norm")),
                     "grad_norm_decay": (0.8, "grad_norm"), "outlier_threshold": (13.0, "outlier"),
                     "cyclic_order": ("random", "cyclic")}


def strategy_options(strategy: str) -> list[str]:
    """The lisa.* options `strategy` reads."""
    return [key for key, (_, readers) in _STRATEGY_OPTIONS.items()
            if strategy in ((readers,) if isinstance(readers, str) else readers)]


def _validate_lisa(lisa: LisaConfig) -> None:
    _at_least("lisa.gamma", lisa.gamma, 1)
    _at_least("lisa.interval", lisa.interval, 1)
    for key, (default, readers) in _STRATEGY_OPTIONS.items():
        readers = (readers,) if isinstance(readers, str) else readers
        value = getattr(lisa, key)
        _require(value == default or lisa.strategy in readers,
                 f"lisa.{key}={value} is read by lisa.strategy={'/'.join(readers)} only, but lisa.strategy="
                 f"{lisa.strategy}; set lisa.strategy: {readers[0]} or drop lisa.{key}")
    _require(lisa.strategy != "routing" or lisa.unit == "expert",
             f"lisa.strategy=routing draws routed experts by their share of the tokens; it needs lisa.unit=expert, "
             f"got lisa.unit={lisa.unit}")
    _require(lisa.strategy != "weights" or lisa.layer_weights is not None,
             "lisa.strategy=weights needs lisa.layer_weights (one weight per sampled unit)")
    _require(0 < lisa.uniform_mix <= 1, f"lisa.uniform_mix must be in (0, 1] so every unit can be drawn, "
                                        f"got {lisa.uniform_mix}")
    _require(0 <= lisa.grad_norm_decay < 1, f"lisa.grad_norm_decay must be in [0, 1), got {lisa.grad_norm_decay}")
    _require(lisa.outlier_threshold > 0 and math.isfinite(lisa.outlier_threshold),
             f"lisa.outlier_threshold must be a positive number, got {lisa.outlier_threshold}")
    weights = lisa.layer_weights
    if weights is not None:
        _require(all(0 <= w < float("inf") for w in weights),
                 f"lisa.layer_weights must be finite and >= 0, got {weights}")
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
    _require(not (c.method == "lisa" and c.lisa.inactive_update != "none" and accumulation > 1),
             f"lisa.inactive_update={c.lisa.inactive_update} updates the units not sampled during backward and keeps "
             f"none of their gradients, but train.global_batch_size={c.train.global_batch_size} over micro-batches "
             f"of {c.train.micro_batch_size} on {world_size} ranks needs {accumulation} accumulation steps, which "
             f"would keep every unit's gradient; set train.micro_batch_size={c.train.global_batch_size // world_size}"
             " or lisa.inactive_update=none")
