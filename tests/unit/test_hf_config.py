"""LisaDistTrainer's configuration: TrainingArguments own the run settings, the accelerate file's are
applied, and a contradiction between any two sources is an error naming it."""

import pytest
import torch
import transformers

from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.env import read_launch_env
from lisa_dist.errors import ConfigError
from lisa_dist.hf import for_the_trainer, trainer_config

ZERO3_LAUNCH = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)


def training_args(tmp_path, **kwargs) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_training_arguments_and_the_accelerate_file_fill_the_config(tmp_path, model):
    args = training_args(tmp_path, learning_rate=3e-4, weight_decay=0.1, max_grad_norm=0.5, seed=7)
    config = trainer_config(args, {"optim": {"name": "adalomo"}}, model, read_launch_env(ZERO3_LAUNCH))
    assert (config.optim.lr, config.optim.weight_decay, config.optim.max_grad_norm, config.seed) == (3e-4, 0.1, 0.5, 7)
    assert config.optim.name == "adalomo" and config.engine.name == "zero3" and config.train.dtype == "fp32"


def test_a_setting_of_the_training_arguments_repeated_in_lisa_dist_is_an_error(tmp_path, model):
    with pytest.raises(ConfigError,
                       match="sets optim.lr: with the Trainer it comes from TrainingArguments.learning_rate"):
        trainer_config(training_args(tmp_path), {"optim": {"lr": 1e-3}}, model, read_launch_env({}))


def test_accumulation_in_the_accelerate_file_must_match_the_training_arguments(tmp_path, model):
    env = read_launch_env({**ZERO3_LAUNCH, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 contradicts TrainingArguments"):
        trainer_config(training_args(tmp_path, gradient_accumulation_steps=2), {}, model, env)
    trainer_config(training_args(tmp_path, gradient_accumulation_steps=4), {}, model, env)


@pytest.mark.parametrize(("flag", "dtype"), [("bf16", "bf16"), ("fp16", "fp16")])
def test_the_precision_flags_mean_train_dtype(tmp_path, model, flag, dtype):
    config = trainer_config(training_args(tmp_path, **{flag: True}), {}, model, read_launch_env({}))
    assert config.train.dtype == dtype


def test_gradient_checkpointing_means_model_activation_checkpointing(tmp_path, model):
    args = training_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert trainer_config(args, {}, model, read_launch_env({})).model.activation_checkpointing is True
    assert trainer_config(training_args(tmp_path), {}, model,
                          read_launch_env({})).model.activation_checkpointing is False


def test_a_flag_contradicting_lisa_dist_settings_is_an_error_naming_both(tmp_path, model):
    with pytest.raises(ConfigError, match=r"TrainingArguments sets train.dtype='bf16' but the run config sets "
                                          r"train.dtype='fp32'"):
        trainer_config(training_args(tmp_path, bf16=True), {"train": {"dtype": "fp32"}}, model, read_launch_env({}))


def test_checkpointing_options_lisa_dist_cannot_honour_are_refused_by_name(tmp_path, model):
    args = training_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ConfigError, match=r"checkpointing_kwargs use_reentrant=True: lisa_dist checkpoints"):
        trainer_config(args, {}, model, read_launch_env({}))


def test_the_trainer_gets_the_taken_over_flags_off_and_the_launchers_mixed_precision(tmp_path):
    args = training_args(tmp_path, bf16=True, gradient_checkpointing=True)
    copy = for_the_trainer(args, read_launch_env({"ACCELERATE_MIXED_PRECISION": "bf16"}))
    assert (copy.bf16, copy.fp16, copy.gradient_checkpointing, copy.mixed_precision) == (False, False, False, "bf16")
    assert not getattr(copy, "activation_checkpointing", False)
    assert args.bf16 and args.gradient_checkpointing and args.mixed_precision == "bf16"
    assert for_the_trainer(args, read_launch_env({})).mixed_precision == "no"
