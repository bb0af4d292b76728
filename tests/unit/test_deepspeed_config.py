import json

import pytest

from lisa_dist.engines.deepspeed_config import load_deepspeed_config
from lisa_dist.errors import ConfigError
from tests.helpers import tiny_config


def _load(tmp_path, ds: dict, world_size: int = 2, **sections):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return load_deepspeed_config(tiny_config(tmp_path, engine={"name": "zero3", "deepspeed_config": str(path)},
                                             **sections), world_size)


def test_batch_sizes_and_precision_are_filled_from_the_run(tmp_path):
    ds = _load(tmp_path, {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"},
                          "train_batch_size": "auto"}, train={"dtype": "bf16"})
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["memory_efficient_linear"] is False


@pytest.mark.parametrize("ds, message", [
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' block"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' block"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2: engine.name=zero3 needs stage 3"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}, "hpZ secondary partitions are not supported"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 4}}, "MiCS partition layouts are not supported"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4 contradicts"),
    ({"fp16": {"enabled": True}}, "fp16.enabled=True contradicts train.dtype=fp32"),
    ({"gradient_clipping": 5.0}, "gradient_clipping=5.0 contradicts optim.max_grad_norm"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": 0}}, "reduce_bucket_size=0: lisa_dist reduce-scatters"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "5e8"}}, "reduce_bucket_size='5e8'"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": 2.5}}, "give a positive whole number"),
])
def test_contradictions_name_the_key(tmp_path, ds, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _load(tmp_path, ds)


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
    for name in ("zero3.json", "zero3_offload.json"):
        config = tiny_config(tmp_path, engine={"name": "zero3", "deepspeed_config": str(root / name)})
        assert load_deepspeed_config(config, 2)["zero_optimization"]["stage"] == 3


def test_reduce_bucket_size_is_kept_whole_and_auto_is_the_engines_default(tmp_path):
    ds = _load(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8}})
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert isinstance(ds["zero_optimization"]["reduce_bucket_size"], int)
    # "auto" (as Hugging Face's example configs write it) would fail DeepSpeed's own validation: the engine
    # then buckets by its default, the largest decoder-layer parameter
    auto = _load(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    assert "reduce_bucket_size" not in auto["zero_optimization"]
