"""`lisa-dist estimate` (fake tensors, fake process group) against real measured peaks of the same run."""

import pytest

from lisa_dist.config import load_config
from lisa_dist.sizing.estimate import run_estimate
from lisa_dist.sizing.memory import GIB
from lisa_dist.sizing.plan import ModelShape
from tests.helpers import REPO, run_distributed, start_trainer, tiny_config

TINY = ["model.path=" + str(REPO / "lisa_dist" / "assets" / "tiny-llama"), "data.seq_len=64",
        "train.global_batch_size=16", "train.micro_batch_size=4", "lisa.interval=5"]


def estimates(*arg_lists: list[str], world_size: int = 2, gpu: float = 22.35) -> list[dict]:
    """What `lisa-dist estimate configs/tiny.yaml ARGS --world-size W --gpu-mem-gib G --json` prints, for each
    argument list, computed in this process (the 70B tests in test_plan.py run the command itself)."""
    return [run_estimate(load_config(REPO / "configs" / "tiny.yaml", args), world_size, gpu) for args in arg_lists]


def estimate(*args: str, world_size: int = 2, gpu: float = 22.35) -> dict:
    return estimates(list(args), world_size=world_size, gpu=gpu)[0]


SHALLOW_7B = ["model.path=null", "model.preset=llama2-7b", "model.num_layers=2", "lisa.gamma=1",
              "train.global_batch_size=2", "train.micro_batch_size=1"]
"""LLaMA-2-7B's shapes (4096 hidden, 32000 words) with two decoder layers: real runs fit in CPU memory."""


def _measured_worker(rank: int, world_size: int, output_dir: str, method: str, optim: str, shallow_7b: bool,
                     model_path: str | None = None) -> float:
    model = {"path": None, "preset": "llama2-7b", "num_layers": 2} if shallow_7b else {}
    model = {"path": model_path} if model_path else model
    batch = {"global_batch_size": 2, "micro_batch_size": 1} if shallow_7b else {
        "global_batch_size": 16, "micro_batch_size": 4 if method == "lisa" else 8}
    config = tiny_config(output_dir, method=method, lisa={"gamma": 1 if shallow_7b else 2, "interval": 5},
                         data={"seq_len": 64}, train={"dtype": "bf16", **batch},
                         optim={"name": optim, "lr": 1e-3}, **({"model": model} if model else {}))
    trainer = start_trainer(config)
    return max(trainer._measured_step(step)["peak_mem_gib"] for step in ([0, 1, 5] if method == "lisa" else [0, 1]))


@pytest.mark.parametrize("method, optim", [("lisa", "adamw"), ("full", "lomo"), ("full", "adamw")])
def test_estimate_matches_the_measured_peak_of_the_same_run(tmp_path, method, optim):
    micro = "4" if method == "lisa" else "8"
    result = estimate(*TINY, f"method={method}", f"optim.name={optim}", "optim.lr=1e-3", "train.dtype=bf16",
                      f"train.micro_batch_size={micro}")
    measured = run_distributed(_measured_worker, 2, output_dir=str(tmp_path), method=method, optim=optim,
                               shallow_7b=False)[0]
    assert {"peak_gib", "fits", "world_size", "categories"} <= result.keys() and result["world_size"] == 2
    assert result["peak_gib"] == pytest.approx(measured, rel=0.10)


def test_a_mixture_of_experts_estimate_matches_its_measured_peak_and_needs_bf16(tmp_path):
    from lisa_dist.errors import ConfigError
    from tests.families import write_family

    model = str(write_family("mixtral", tmp_path / "mixtral"))
    args = [*TINY, f"model.path={model}", "method=lisa", "optim.name=adamw", "optim.lr=1e-3",
            "train.micro_batch_size=4"]
    result = estimate(*args, "train.dtype=bf16")
    measured = run_distributed(_measured_worker, 2, output_dir=str(tmp_path / "run"), method="lisa", optim="adamw",
                               shallow_7b=False, model_path=model)[0]
    assert result["categories"]["optimizer_state"] > 0
    assert result["peak_gib"] == pytest.approx(measured, rel=0.10)
    with pytest.raises(ConfigError, match="mixture-of-experts model needs train.dtype=bf16"):
        estimate(*args, "train.dtype=fp32")


@pytest.mark.slow
@pytest.mark.bf16_compute
@pytest.mark.parametrize("method, optim", [("lisa", "adamw"), ("full", "lomo")])
def test_estimate_matches_the_measured_peak_of_a_shallow_7b(tmp_path, method, optim):
    result = estimate(*TINY, *SHALLOW_7B, f"method={method}", f"optim.name={optim}", "optim.lr=1e-3",
                      "train.dtype=bf16")
    measured = run_distributed(_measured_worker, 2, output_dir=str(tmp_path), method=method, optim=optim,
                               shallow_7b=True)[0]
    # Measured 2026-11-22: the estimate is 10-12 % below the storage-accounted peak here (docs/estimate.md)
    assert result["peak_gib"] == pytest.approx(measured, rel=0.15)


def test_offload_moves_optimizer_state_and_checkpointed_activations_to_host_memory():
    # 256 tokens x 4096 x bf16 = 2 MiB per layer input: above the offload threshold
    common = [*TINY, *SHALLOW_7B, "data.seq_len=256", "model.activation_checkpointing=true", "train.dtype=bf16"]
    resident, offloaded, resident_lomo, offloaded_lomo = estimates(
        common, [*common, "optim.offload_state=true"], [*common, "method=full", "optim.name=lomo"],
        [*common, "method=full", "optim.name=lomo", "model.activation_offload=true"])
    state = resident["categories"]["optimizer_state"]
    assert state > 0 and resident["host_offload_gib"] == 0
    assert offloaded["categories"]["optimizer_state"] < 1e-6 * state  # only the step counters stay
    assert offloaded["host_offload_gib"] == pytest.approx(state, rel=1e-6)
    assert offloaded["peak_gib"] < resident["peak_gib"]
    # LOMO peaks in backward, where the checkpointed layer inputs are
    assert offloaded_lomo["categories"]["activations"] < resident_lomo["categories"]["activations"]
    assert offloaded_lomo["host_offload_gib"] > 0 and offloaded_lomo["peak_gib"] < resident_lomo["peak_gib"]


def test_parameter_offload_keeps_shards_gradients_and_updates_in_host_memory():
    """engine.offload_params (FSDP2's CPUOffloadPolicy): the shards, their gradients, the optimizer state and
    each update are on the host. Op for op the step is the same, so at every moment the device holds at most
    what it held without offload, less the shards, plus one unit's shards copied in for its all-gather."""
    common = [*TINY, *SHALLOW_7B, "model.activation_checkpointing=true", "train.dtype=bf16"]
    resident, offloaded = estimates(common, [*common, "engine.offload_params=true"])
    on_card, off_card = resident["categories"], offloaded["categories"]
    assert on_card["sharded_params"] > 0 and on_card["optimizer_state"] > 0 and resident["host_offload_gib"] == 0
    assert off_card["sharded_params"] == off_card["optimizer_state"] == off_card["sharded_grads"] == 0
    assert offloaded["host_offload_gib"] >= on_card["sharded_params"] + on_card["optimizer_state"]
    shape = ModelShape.of(load_config(REPO / "configs" / "tiny.yaml", common))
    largest_unit = max(max(shape.layers), shape.embeddings, shape.head + shape.norm)
    assert off_card["host_to_device_copies"] * GIB == largest_unit * 2 // 2  # bf16, 2 ranks: FSDP2's own sizes
    assert offloaded["peak_gib"] <= resident["peak_gib"] - on_card["sharded_params"] + off_card["host_to_device_copies"]
