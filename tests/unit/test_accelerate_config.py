"""accelerate config files: the variables accelerate's own launcher derives from a file become run
configuration, or an error naming the setting lisa_dist cannot honour."""

import os
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from lisa_dist.accelerate_config import read_accelerate_settings
from lisa_dist.config import load_config
from lisa_dist.env import read_launch_env
from lisa_dist.errors import ConfigError
from tests.helpers import REPO, accelerate_variant

FSDP2_FILE = REPO / "configs" / "accelerate" / "fsdp2.yaml"
ZERO3_FILE = REPO / "configs" / "accelerate" / "zero3.yaml"
TINY = REPO / "configs" / "tiny.yaml"


def launch_variables(config_file: Path) -> dict[str, str]:
    """What `accelerate launch --config_file F` puts in each rank's environment, from accelerate's own code."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(config_file), "--main_process_port", "0", "-m", "lisa_dist", "train", "run.yaml"])
    args, defaults, precision_from_file = _validate_launch_command(args)
    before = dict(os.environ)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_file else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    ranks = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "TORCHELASTIC_RUN_ID": "x"}
    return {**{k: v for k, v in env.items() if before.get(k) != v}, **ranks}


def settings_of(config_file: Path):
    return read_accelerate_settings(dict(read_launch_env(launch_variables(config_file)).accelerate))


def test_the_launch_is_recognized_as_accelerate():
    env = read_launch_env(launch_variables(FSDP2_FILE))
    assert env.launcher == "accelerate" and env.world_size == 2
    assert read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}).accelerate == ()


def test_the_bundled_fsdp2_file_sets_the_fsdp2_engine_and_its_options():
    assert settings_of(FSDP2_FILE).config == {
        "train.dtype": "bf16", "engine.name": "fsdp2", "engine.reshard_after_forward": True,
        "engine.offload_params": False, "model.activation_checkpointing": False, "model.activation_offload": False,
        "engine.backward_prefetch": True}


def test_the_bundled_zero3_file_sets_the_zero3_engine_and_its_deepspeed_json():
    assert settings_of(ZERO3_FILE).config == {"train.dtype": "bf16", "engine.name": "zero3",
                                              "engine.deepspeed_config": "configs/deepspeed/zero3.json"}


def test_fsdp_options_are_honoured(tmp_path):
    path = accelerate_variant(tmp_path, FSDP2_FILE.name, mixed_precision="no",
                              fsdp_config__fsdp_reshard_after_forward=False,
                              fsdp_config__fsdp_offload_params=True, fsdp_config__fsdp_activation_checkpointing=True,
                              fsdp_config__fsdp_activation_checkpointing_offload=True,
                              fsdp_config__fsdp_backward_prefetch="NO_PREFETCH",
                              fsdp_config__fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer")
    config = settings_of(path).config
    assert config["train.dtype"] == "fp32" and config["engine.reshard_after_forward"] is False
    assert config["engine.offload_params"] and config["model.activation_checkpointing"]
    assert config["model.activation_offload"] and config["engine.backward_prefetch"] is False
    assert config["engine.layer_class"] == "LlamaDecoderLayer"


def test_deepspeed_options_are_honoured(tmp_path):
    path = accelerate_variant(tmp_path, ZERO3_FILE.name, mixed_precision="fp16",
                              deepspeed_config={"zero_stage": 3, "offload_optimizer_device": "cpu",
                                                "gradient_clipping": 0.5, "gradient_accumulation_steps": 2,
                                                "zero3_init_flag": True})
    settings = settings_of(path)
    assert settings.config == {"train.dtype": "fp16", "engine.name": "zero3", "optim.offload_state": True,
                               "optim.max_grad_norm": 0.5}
    settings.check_world_size(global_batch_size=8, micro_batch_size=2, world_size=2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 contradicts"):
        settings.check_world_size(global_batch_size=8, micro_batch_size=1, world_size=2)


@pytest.mark.parametrize("base, changes, message", [
    (FSDP2_FILE, {"fsdp_config__fsdp_version": 1}, r"fsdp_version=1 is not supported: .*FSDP2"),
    (FSDP2_FILE, {"fsdp_config__fsdp_auto_wrap_policy": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy=SIZE_BASED_WRAP"),
    (FSDP2_FILE, {"fsdp_config__fsdp_transformer_layer_cls_to_wrap": "A,B"}, "name that one class"),
    (FSDP2_FILE, {"fsdp_config__fsdp_backward_prefetch": "BACKWARD_POST"}, "fsdp_backward_prefetch=BACKWARD_POST"),
    (FSDP2_FILE, {"fsdp_config__fsdp_forward_prefetch": True}, "fsdp_forward_prefetch=true"),
    (FSDP2_FILE, {"fsdp_config__fsdp_activation_checkpointing_offload": True}, "needs fsdp_activation_checkpointing"),
    (FSDP2_FILE, {"dynamo_config": {"dynamo_backend": "INDUCTOR"}}, "dynamo_backend=INDUCTOR"),
    (ZERO3_FILE, {"deepspeed_config": {"zero_stage": 2}}, "zero_stage=2"),
    (ZERO3_FILE, {"deepspeed_config": {"zero_stage": 3, "offload_param_device": "cpu"}}, "offload_param_device=cpu"),
    (ZERO3_FILE, {"deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": "nvme"}},
     "offload_optimizer_device=nvme"),
    (ZERO3_FILE, {"deepspeed_config": {"deepspeed_config_file": "x.json", "zero3_init_flag": False}},
     "zero3_init_flag=false"),
])
def test_settings_lisa_dist_cannot_honour_are_errors(tmp_path, base, changes, message):
    with pytest.raises(ConfigError, match=message):
        settings_of(accelerate_variant(tmp_path, base.name, **changes))


def test_fp8_tensor_parallelism_and_unknown_variables_are_errors():
    # accelerate itself refuses fp8 on a machine without an fp8 backend, so the variable is set directly.
    with pytest.raises(ConfigError, match="mixed_precision=fp8"):
        read_accelerate_settings({"ACCELERATE_MIXED_PRECISION": "fp8"})
    with pytest.raises(ConfigError, match="PARALLELISM_CONFIG_TP_SIZE"):
        read_accelerate_settings({"ACCELERATE_MIXED_PRECISION": "no", "PARALLELISM_CONFIG_TP_SIZE": "2"})
    with pytest.raises(ConfigError, match="ACCELERATE_CPU_AFFINITY=1 is not supported"):
        read_accelerate_settings({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_CPU_AFFINITY": "1"})


def test_the_file_fills_unset_keys_and_a_contradiction_names_both():
    implied = settings_of(FSDP2_FILE).config
    config = load_config(TINY, ["model.activation_checkpointing=false"], implied=implied)
    assert config.engine.name == "fsdp2" and config.train.dtype == "bf16"
    with pytest.raises(ConfigError, match=r"sets train.dtype='bf16' but the run config sets train.dtype='fp32'"):
        load_config(TINY, ["train.dtype=fp32"], implied=implied, implied_by="the accelerate config file")


def test_a_layer_class_other_than_the_models_stops_before_training():
    from lisa_dist.models.build import check_against_model, resolve_model_source

    config = load_config(TINY, ["engine.layer_class=GPT2Block"])
    with pytest.raises(ConfigError, match="decoder layers are LlamaDecoderLayer"):
        check_against_model(config, resolve_model_source(config).hf_config)
    check_against_model(load_config(TINY, ["engine.layer_class=LlamaDecoderLayer"]),
                        resolve_model_source(config).hf_config)
