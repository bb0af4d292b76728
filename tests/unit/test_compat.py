"""The private symbols of lisa_dist._compat exist in the locked versions and still do what lisa_dist uses
them for; an upgrade that breaks one fails here, naming it."""

import inspect
import re

import pytest
import torch

from lisa_dist import _compat
from lisa_dist.config import load_config
from tests.helpers import REPO


@pytest.mark.parametrize("symbol", [p.symbol for p in _compat.PRIVATE])
def test_every_private_symbol_resolves(symbol):
    assert _compat.resolve(symbol) is not None


def test_a_missing_symbol_is_an_import_error_naming_it_and_the_version():
    expected = f"lisa_dist needs torch.nn:NoSuchModule, which torch {torch.__version__} does not have"
    with pytest.raises(ImportError, match=re.escape(expected)):
        _compat.resolve("torch.nn:NoSuchModule")


def test_everything_the_package_imports_from_compat_resolves_to_its_listed_symbol():
    for name in _compat._EXPORTS:
        assert getattr(_compat, name) is _compat.resolve(_compat._EXPORTS[name])


def test_fsdp2_calls_the_flat_collectives_by_the_names_compat_resolves():
    """Tests count FSDP2's collectives by wrapping `torch.distributed.<name>`: the names must be the ones this
    torch's FSDP2 looks up at call time (renamed in torch 2.13)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    source = inspect.getsource(_fsdp_collectives)
    for name in (_compat.REDUCE_SCATTER, _compat.ALL_GATHER):
        assert callable(getattr(torch.distributed, name))
        assert f"dist.{name}(" in source, name


def test_every_entry_says_why():
    assert all(len(p.reason) > 20 for p in _compat.PRIVATE)
    assert len({p.symbol for p in _compat.PRIVATE}) == len(_compat.PRIVATE)


def test_the_torch_internals_estimate_uses_still_run_a_step():
    """FakeTensorMode, the fake process group, FSDP2's lazy init and shard offsets, and the peak-only
    memory tracker (with optimizer state filed as such) on the tiny model."""
    from lisa_dist.sizing.estimate import run_estimate

    config = load_config(REPO / "configs" / "tiny.yaml", ["data.seq_len=32", "optim.name=adamw"])
    result = run_estimate(config, world_size=2, gpu_mem_gib=22.35)
    assert result["peak_gib"] > 0 and result["categories"]["optimizer_state"] > 0
    assert result["categories"]["sharded_params"] > 0


def test_trainer_methods_lisa_dist_overrides_keep_their_signatures():
    import transformers

    from lisa_dist.hf import LisaDistTrainer

    for private in _compat.PRIVATE:
        module, _, path = private.symbol.partition(":")
        if module != "transformers" or not path.startswith("Trainer."):
            continue
        name = path.split(".", 1)[1]
        ours = LisaDistTrainer.__dict__.get(name)
        theirs = getattr(transformers.Trainer, name)
        if ours is not None:
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), name


def test_the_zero3_coordinator_takes_the_arguments_lisa_dist_passes():
    coordinator = _compat.resolve("deepspeed.runtime.zero.parameter_offload:DeepSpeedZeRoOffload")
    passed = {"module", "timers", "ds_config", "overlap_comm", "prefetch_bucket_size", "max_reuse_distance",
              "max_live_parameters", "param_persistence_threshold", "model_persistence_threshold",
              "dp_process_group", "offload_param_config", "mpu"}
    assert passed <= set(inspect.signature(coordinator.__init__).parameters)


def test_the_attention_kernel_of_a_model_built_from_a_config():
    from lisa_dist.assets import TINY_MODEL_DIR
    from lisa_dist.models.build import build_meta_model

    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR)
    model = build_meta_model(hf_config, torch.float32, "eager")
    assert model.config._attn_implementation == "eager"
    with _compat.no_init_weights():
        assert transformers.AutoModelForCausalLM.from_config(hf_config) is not None


def test_a_chunked_loss_on_fsdp2_is_refused_exactly_where_torch_cannot_recompute_the_head(tmp_path):
    from lisa_dist.engines.fsdp2 import FSDP2Engine
    from lisa_dist.errors import ConfigError
    from tests.helpers import tiny_config

    config = tiny_config(tmp_path, train={"loss_chunk_tokens": 16})
    if _compat.RECOMPUTES_GROUPED_UNITS:
        FSDP2Engine.check_config(config, 2)
    else:
        with pytest.raises(ConfigError, match=r"train.loss_chunk_tokens=16 on engine.name=fsdp2 needs torch >= 2.13"):
            FSDP2Engine.check_config(config, 2)
    FSDP2Engine.check_config(tiny_config(tmp_path, train={"loss_chunk_tokens": 0}), 2)


@pytest.mark.parametrize("declared", [None, True, False, "absent"])
def test_whether_a_trainers_loss_is_scaled_for_accumulation_follows_the_trainers_rule(declared):
    from types import SimpleNamespace

    for accepts, items, func in [(True, 10, None), (True, None, None), (False, 10, None), (False, None, len)]:
        trainer = SimpleNamespace(model_accepts_loss_kwargs=accepts, compute_loss_func=func)
        if declared != "absent":  # transformers 5.17's Trainer has no loss_is_scaled_for_ga
            trainer.loss_is_scaled_for_ga = declared
        rule = (accepts and items is not None) or func is not None
        expected = rule if declared in (None, "absent") else declared
        assert _compat.loss_is_scaled_for_accumulation(trainer, items) == expected
