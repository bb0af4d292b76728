"""Every key of the config dataclasses is honoured or refused, by name, on every entry point.

"Honoured" is observed, not declared: each entry point runs a few short jobs in this process (a world of
one, FSDP2) on a config whose every read is recorded, over variants that reach each optimizer, precision
and option; a key no variant ever read was dropped. "Refused" is a ConfigError naming the key when it is
set. A key that is neither fails the test, with its name."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from lisa_dist._compat import RECOMPUTES_GROUPED_UNITS
from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.config import Config
from lisa_dist.errors import ConfigError
from tests.helpers import REPO, failing_writes, tiny_config


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += all_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


RECORDING = {"on": True}


class Recorder:
    """Stands for a Config (or one of its sections) and records the dotted key of every field read
    (except inside the checks that only validate a key: reading it there honours nothing)."""

    def __init__(self, target: Any, reads: set[str], prefix: str = "") -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value):  # to_dict() serializes for checkpoints and cross-rank checks: no read of its own
            return value
        if dataclasses.is_dataclass(value):
            return Recorder(value, self._reads, f"{self._prefix}{name}.")
        if RECORDING["on"]:
            self._reads.add(f"{self._prefix}{name}")
        return value


def _unrecorded(check: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        RECORDING["on"] = False
        try:
            return check(*args, **kwargs)
        finally:
            RECORDING["on"] = True

    return run


@pytest.fixture(autouse=True)
def validation_reads_do_not_count(monkeypatch):
    import lisa_dist.distributed
    import lisa_dist.hf
    import lisa_dist.train

    # The runs here start (and end) process groups in the test process; lisa_dist remembers that one was
    # started so its CLI leaves by os._exit, which would end a later in-process CLI test and pytest with it.
    monkeypatch.setattr(lisa_dist.distributed, "_started", lisa_dist.distributed._started)

    for module, name in ((lisa_dist.train, "check_world_size"), (lisa_dist.hf, "validate_training")):
        monkeypatch.setattr(module, name, _unrecorded(getattr(module, name)))


# Variants that between them reach every optimizer, precision and option (each two steps in one process).
VARIANTS: list[dict[str, Any]] = [
    {"method": "lisa", "save_every": 1, "save_total_limit": 1,
     "lisa": {"strategy": "weights", "layer_weights": [1.0] * 8},
     "model": {"activation_checkpointing": True},
     # FSDP2 below torch 2.13 refuses a nonzero loss_chunk_tokens (_compat.RECOMPUTES_GROUPED_UNITS); 0 is still read
     "train": {"loss_chunk_tokens": 16 if RECOMPUTES_GROUPED_UNITS else 0, "reduce_dtype": "param",
               "max_consecutive_skips": 5},
     "optim": {"name": "adamw", "clip_grad_value": 1.0, "schedule": "cosine", "warmup_steps": 1,
               "min_lr_ratio": 0.1, "weight_decay": 0.01, "offload_state": True},
     "engine": {"split_layers": True, "backward_prefetch": False, "reshard_after_forward": False,
                "layer_class": "LlamaDecoderLayer"}},
    {"method": "full", "model": {"activation_offload": True, "attn_implementation": "eager"},
     "train": {"dtype": "fp16", "micro_batch_size": 8, "loss_scale": 1024.0},
     "optim": {"name": "adalomo", "fused_precheck": True, "max_grad_norm": 1.0}},
    {"train": {"dtype": "bf16"}, "optim": {"name": "sgd", "momentum": 0.9, "stochastic_rounding": True},
     "engine": {"offload_params": True},
     "lisa": {"strategy": "grad_norm", "unit": "block", "uniform_mix": 0.2, "grad_norm_decay": 0.5}},
    {"lisa": {"strategy": "cyclic", "cyclic_order": "ascending", "interval": 1}},
    {"lisa": {"inactive_update": "adalomo", "inactive_lr": 0.01}, "train": {"micro_batch_size": 8}},
    {"optim": {"name": "lomo"}, "data": {"eval_fraction": 0.05, "fields": {"instruction": "instruction"}},
     "lisa": {"strategy": "outlier", "outlier_threshold": 5.0},
     "eval_every": 1, "eval_max_batches": 1,
     "logging": {"report_to": ["tensorboard", "wandb"], "wandb_project": "keys", "log_every": 1}},
]
MODEL_SOURCES = [{"path": None, "preset": "tiny", "num_layers": 4}, {"path": None, "config": str(TINY_MODEL_DIR)}]
ENV_ONE = {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1, "launcher": "single"}


def probe(key: str) -> Any:
    """A value for `key` other than its default, of its type."""
    section, _, name = key.rpartition(".")
    default = getattr(getattr(Config(), section) if section else Config(), name)
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, list):
        return [v / 2 for v in default]
    return "probe.json"


def _cli_reads(tmp_path: Path) -> set[str]:
    from lisa_dist.env import LaunchEnv
    from lisa_dist.train import run_training

    reads: set[str] = set()
    env = LaunchEnv(**ENV_ONE)
    for i, variant in enumerate(VARIANTS):
        run_training(Recorder(tiny_config(tmp_path / f"cli{i}", max_steps=2, **variant), reads), env)
    # The first run again, continued from its newest checkpoint (resume is read only then).
    run_training(Recorder(tiny_config(tmp_path / "cli0", max_steps=2, resume="auto", **VARIANTS[0]), reads), env)
    # A run whose first checkpoint cannot be written (save_errors is read only then).
    with failing_writes(0, 0, "state", step=1):
        run_training(Recorder(tiny_config(tmp_path / "cli_full", max_steps=2, save_every=1, save_errors="continue"),
                              reads), env)
    return reads


def _hf_settings(variant: dict[str, Any], set_by_script: dict[str, str]) -> dict[str, Any]:
    settings = {}
    for key, value in variant.items():
        if key in set_by_script:
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{key}.{k}" not in set_by_script}
        settings[key] = value
    return settings


def _hf_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    import lisa_dist.hf as hf
    from lisa_dist.assets import TINY_ALPACA
    from lisa_dist.data import build_sequences, load_examples
    from lisa_dist.distributed import shutdown

    reads: set[str] = set()
    real = hf.from_dict  # the config trainer_config builds, checks and hands to the core
    monkeypatch.setattr(hf, "from_dict", lambda raw: Recorder(real(raw), reads))
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    sequences = build_sequences(load_examples(TINY_ALPACA, tokenizer), 48, tokenizer.eos_token_id, pack=False)
    dataset = [{"input_ids": sequences.input_ids[i], "labels": sequences.labels[i],
                "attention_mask": sequences.attention_mask[i]} for i in range(32)]
    for i, variant in enumerate(VARIANTS):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(variant.get("train", {}).get("dtype"),
                                                                    torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=dtype)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"hf{i}"), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3,
            save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True)
        try:
            trainer = hf.LisaDistTrainer(model=model, args=args, train_dataset=dataset,
                                         lisa_dist=_hf_settings(variant, hf.SET_BY_THE_SCRIPT))
            trainer.train()
        finally:
            shutdown()
    return reads


def _estimate_reads() -> set[str]:
    from lisa_dist.sizing.estimate import run_estimate
    from lisa_dist.train import prepare

    reads: set[str] = set()
    for variant in VARIANTS:
        one_micro_batch = {**variant.get("train", {}), "global_batch_size": 2, "micro_batch_size": 2}
        config = tiny_config("unused", max_steps=2, **{**variant, "train": one_micro_batch})
        run_estimate(Recorder(config, reads), world_size=1, gpu_mem_gib=22.35)
    for model in MODEL_SOURCES:  # read by the preparation estimate shares with `train`
        prepare(Recorder(tiny_config("unused", model=model), reads), 1, check_output=False, read_weights=False,
               fill_batch=True)
    return reads


def _missing(reads: set[str], refused: set[str] = frozenset()) -> list[str]:
    """Keys neither read nor refused (a refused section, such as `data`, covers its keys)."""
    return [k for k in all_keys() if k not in reads and k not in refused and k.split(".")[0] not in refused]


def test_lisa_dist_train_reads_every_key(tmp_path, monkeypatch):
    from lisa_dist.train import prepare

    monkeypatch.setenv("WANDB_MODE", "offline")  # read by wandb itself

    reads = _cli_reads(tmp_path)
    # The other model sources, and the ZeRO-3 engine's own file (read by its checks before any process
    # group): the preparation that reads them is the same for every run.
    for model in MODEL_SOURCES:
        prepare(Recorder(tiny_config(tmp_path / "other", model=model, engine={"name": "zero3"}), reads), 1,
                check_output=False)
    assert _missing(reads) == []


def test_the_trainer_path_reads_every_key_a_trainer_script_does_not_set_elsewhere(tmp_path, monkeypatch):
    import lisa_dist.hf as hf
    from lisa_dist.env import read_launch_env

    missing = _missing(_hf_reads(tmp_path, monkeypatch), set(hf.SET_BY_THE_SCRIPT))
    # What the FSDP2 variants never read must be refused on them: the ZeRO-3 engine's file.
    assert missing == ["engine.deepspeed_config"]
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="engine.deepspeed_config=probe.json applies to engine.name=zero3"):
        hf.trainer_config(args, {"engine": {"deepspeed_config": probe("engine.deepspeed_config")}}, model,
                          read_launch_env({}))


def test_the_trainer_path_refuses_every_key_the_script_sets_elsewhere_naming_where(tmp_path):
    import lisa_dist.hf as hf
    from lisa_dist.env import read_launch_env

    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    for key, where in hf.SET_BY_THE_SCRIPT.items():
        section, _, name = key.rpartition(".")
        if not section:
            settings = {key: {"path": "x"} if key == "data" else probe(key)}
        else:
            settings = {section: {name: probe(key)}}
        with pytest.raises(ConfigError,
                           match=f"sets {re.escape(key)}: with the Trainer it comes from {re.escape(where)}"):
            hf.trainer_config(args, settings, model, read_launch_env({}))


def test_estimate_reads_every_key_that_changes_the_peak_and_names_the_rest(tmp_path):
    from lisa_dist.sizing.estimate import NOT_MODELLED

    from lisa_dist.config import load_config

    # estimate runs the FSDP2 step; the ZeRO-3 engine's file is refused with it, as for `train`.
    with pytest.raises(ConfigError, match="engine.deepspeed_config=probe.json applies to engine.name=zero3"):
        load_config(REPO / "configs" / "tiny.yaml", [f"engine.deepspeed_config={probe('engine.deepspeed_config')}"])
    assert _missing(_estimate_reads(), {*NOT_MODELLED, "engine.deepspeed_config"}) == []
