"""LisaDistTrainer mixed into TRL's trainers: SFTTrainer's settings take lisa_dist's meaning, and what lisa_dist
cannot run is refused by name before any work (the 2-rank training runs are in tests/cli/test_trl_sft.py)."""

import pytest
import torch
import transformers

from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.env import read_launch_env
from lisa_dist.errors import ConfigError
from lisa_dist.hf import LisaDistTrainer, for_the_trainer, trainer_config

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def tiny_model() -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)


def sft_config(tmp_path, **kwargs) -> "trl.SFTConfig":
    return trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


@pytest.mark.parametrize("name", ["DPOTrainer", "GRPOTrainer", "KTOTrainer", "RewardTrainer"])
def test_a_trl_trainer_other_than_sft_is_refused_by_name_before_it_starts(name):
    mixed = type(f"Lisa{name}", (LisaDistTrainer, getattr(trl, name)), {})
    # no model or arguments: the refusal comes before the TRL trainer would build a reference model or data
    with pytest.raises(ConfigError, match=f"derives from TRL's {name}, which lisa_dist does not run"):
        mixed()


def test_sft_configs_defaults_mean_lisa_dists_bf16_and_checkpointing(tmp_path):
    args = sft_config(tmp_path, activation_offloading=True)
    assert args.bf16 and args.gradient_checkpointing  # SFTConfig's defaults
    config = trainer_config(args, {}, tiny_model(), read_launch_env({}))
    assert config.train.dtype == "bf16" and config.model.activation_checkpointing and config.model.activation_offload
    trainer_args = for_the_trainer(args, read_launch_env({}))
    assert not (trainer_args.bf16 or trainer_args.gradient_checkpointing or trainer_args.activation_offloading)
    assert args.bf16 and args.activation_offloading  # the script's own object is left as it was


def test_sfts_own_loss_on_zero3_is_refused_before_the_process_group_starts(tmp_path):
    class LisaSFT(LisaDistTrainer, trl.SFTTrainer):
        pass

    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    rows = datasets.Dataset.from_list([{"prompt": "Which letter comes after b?\n", "completion": "c"}] * 4)
    args = sft_config(tmp_path, loss_type="dft", bf16=False, gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="engine zero3 with SFTTrainer's own loss"):
        LisaSFT(model=tiny_model(), args=args, train_dataset=rows, processing_class=tokenizer,
                lisa_dist={"engine": {"name": "zero3"}})
    assert not torch.distributed.is_initialized()
