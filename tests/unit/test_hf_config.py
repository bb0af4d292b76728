"""LisaDistTrainer's configuration: TrainingArguments own the run settings, the accelerate file's are
applied, and a contradiction between any two sources is an error naming it."""

import pytest
import torch
import transformers

from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.env import read_launch_env
from lisa_dist.errors import ConfigError
from lisa_dist.hf import trainer_config

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
    with pytest.raises(ConfigError, match="sets optim.lr: with the Trainer it comes from TrainingArguments.learning_rate"):
        trainer_config(training_args(tmp_path), {"optim": {"lr": 1e-3}}, model, read_launch_env({}))


def test_accumulation_in_the_accelerate_file_must_match_the_training_arguments(tmp_path, model):
    env = read_launch_env({**ZERO3_LAUNCH, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 contradicts TrainingArguments"):
        trainer_config(training_args(tmp_path, gradient_accumulation_steps=2), {}, model, env)
    trainer_config(training_args(tmp_path, gradient_accumulation_steps=4), {}, model, env)
