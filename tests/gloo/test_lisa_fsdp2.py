"""LISA on FSDP2 with 2 gloo ranks: frozen layers, optimizer partitions, communication, desync."""

import weakref

import pytest
import torch
import torch.distributed as dist

from lisa_dist._compat import ALL_GATHER, REDUCE_SCATTER
from lisa_dist.errors import RankDisagreementError
from lisa_dist.sizing.memory import StorageTracker
from tests.helpers import run_distributed, start_trainer, tiny_config

GAMMA, INTERVAL = 2, 3


def _layer_shards(trainer) -> list[list[torch.Tensor]]:
    return [[trainer.core.engine.local_shard(p).detach().clone() for p in layer.parameters()]
            for layer in trainer.core.parts.layers]


def _expected_state_bytes(trainer) -> int:
    per_element = 4 + 4 + 4  # fp32 master, exp_avg, exp_avg_sq
    return sum(trainer.core.engine.local_shard(p).numel() * per_element
               for p in trainer.core.model.parameters() if p.requires_grad)


def _lisa_worker(rank: int, world_size: int, output_dir: str) -> dict:
    # weight decay and momentum-carrying AdamW: frozen layers must still not drift
    trainer = start_trainer(tiny_config(output_dir, train={"dtype": "bf16"},
                                        lisa={"gamma": GAMMA, "interval": INTERVAL},
                                        optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}))
    obs: dict = {"reduce_scatters": []}
    calls = []
    original = getattr(dist, REDUCE_SCATTER)

    def counting(*args, **kwargs):
        calls.append(kwargs.get("input", args[1] if len(args) > 1 else None).dtype)
        return original(*args, **kwargs)

    setattr(dist, REDUCE_SCATTER, counting)
    start = _layer_shards(trainer)
    for step in range(INTERVAL):
        calls.clear()
        trainer.train_step(step)
        obs["reduce_scatters"].append(len(calls))
    obs["reduce_dtypes"] = set(calls)
    end = _layer_shards(trainer)
    obs["active_0"] = trainer.core.active_layers
    obs["unchanged"] = [all(torch.equal(a, b) for a, b in zip(s, e)) for s, e in zip(start, end)]
    obs["all_changed"] = [all(not torch.equal(a, b) for a, b in zip(s, e) if a.numel()) for s, e in zip(start, end)]
    obs["state_bytes_0"] = trainer.core.optimizer.state_bytes()
    obs["expected_bytes_0"] = _expected_state_bytes(trainer)
    obs["param_dtypes"] = {trainer.core.engine.local_shard(p).dtype for p in trainer.core.model.parameters()}
    obs["master_dtypes"] = {s.master.dtype for s in trainer.core.optimizer.slots.values() if s.shard.numel()}
    obs["optim_names_0"] = trainer.core.optimizer.names

    # the switch at the next interval, measured by storage accounting
    always_on = {n: s.state["exp_avg"] for n, s in trainer.core.optimizer.slots.items()
                 if not n.startswith("model.layers.")}
    always_steps = {n: int(s.step) for n, s in trainer.core.optimizer.slots.items()
                    if not n.startswith("model.layers.")}
    next_active = trainer.core.sampler.active_layers(INTERVAL)
    leaving = [f"model.layers.{i}." for i in obs["active_0"] if i not in next_active]
    leaving_refs = [weakref.ref(t) for n, s in trainer.core.optimizer.slots.items() if n.startswith(tuple(leaving))
                    for t in list(s.state.values()) + [s.master]]
    obs["num_leaving_tensors"] = len(leaving_refs)
    tracker = StorageTracker()
    tracker.track(trainer.core.model.parameters())
    tracker.track(t for s in trainer.core.optimizer.state_dict().values() for t in s.values())
    before = tracker.live
    with tracker:
        trainer.core.set_active_layers(next_active)
    obs["active_1"] = trainer.core.active_layers
    obs["tracked_delta"] = tracker.live - before
    obs["switch_peak_over_end"] = tracker.peak - max(before, tracker.live)
    obs["state_bytes_1"] = trainer.core.optimizer.state_bytes()
    obs["expected_bytes_1"] = _expected_state_bytes(trainer)
    kept = {n: trainer.core.optimizer.slots[n].state["exp_avg"] for n in always_on}
    obs["always_on_kept"] = all(kept[n] is always_on[n] for n in always_on) and all(
        int(trainer.core.optimizer.slots[n].step) == always_steps[n] for n in always_on)
    obs["leaving_freed"] = all(r() is None for r in leaving_refs)
    left_layers = [i for i in obs["active_0"] if i not in next_active]
    before_step = {i: [trainer.core.engine.local_shard(p).clone() for p in trainer.core.parts.layers[i].parameters()]
                   for i in left_layers}
    calls.clear()
    trainer.train_step(INTERVAL)
    obs["reduce_dtypes_after_switch"] = set(calls)
    obs["left_layers_unchanged"] = all(
        torch.equal(a, trainer.core.engine.local_shard(p)) for i in left_layers
        for a, p in zip(before_step[i], trainer.core.parts.layers[i].parameters()))
    setattr(dist, REDUCE_SCATTER, original)
    obs["frozen_params_require_grad"] = [any(p.requires_grad for p in layer.parameters())
                                         for layer in trainer.core.parts.layers]
    return obs


@pytest.fixture(scope="module")
def lisa_run(tmp_path_factory):
    return run_distributed(_lisa_worker, 2, output_dir=str(tmp_path_factory.mktemp("lisa")))


def test_ranks_agree_on_active_layers_and_exactly_gamma_train(lisa_run):
    assert lisa_run[0]["active_0"] == lisa_run[1]["active_0"] and len(lisa_run[0]["active_0"]) == GAMMA
    assert lisa_run[0]["active_1"] == lisa_run[1]["active_1"]
    assert sum(lisa_run[0]["frozen_params_require_grad"]) == GAMMA


def test_frozen_layers_stay_bit_identical_and_active_layers_change(lisa_run):
    for obs in lisa_run:
        for i in range(len(obs["unchanged"])):
            if i in obs["active_0"]:
                assert obs["all_changed"][i], f"active layer {i} has a shard that did not change"
            else:
                assert obs["unchanged"][i], f"frozen layer {i} changed"


def test_no_gradient_reduce_scatter_for_frozen_layers(lisa_run):
    # one reduce-scatter per FSDP unit with trainable parameters per micro-batch: gamma layers, the
    # embeddings and [final norm, head]
    micro_batches = 8 // (2 * 2)
    for obs in lisa_run:
        assert obs["reduce_scatters"] == [(GAMMA + 2) * micro_batches] * INTERVAL


def test_layers_that_left_the_active_set_do_not_drift(lisa_run):
    # they had AdamW momentum and weight decay in the previous interval; none of it may reach them now
    for obs in lisa_run:
        assert obs["left_layers_unchanged"]


def test_gradients_reduce_in_fp32_before_and_after_a_switch(lisa_run):
    for obs in lisa_run:
        assert obs["reduce_dtypes"] == {torch.float32}
        assert obs["reduce_dtypes_after_switch"] == {torch.float32}


def test_optimizer_state_exists_only_for_active_shards(lisa_run):
    for obs in lisa_run:
        assert obs["state_bytes_0"] == obs["expected_bytes_0"] > 0
        assert obs["param_dtypes"] == {torch.bfloat16}  # stored sharded in the training dtype
        assert obs["master_dtypes"] == {torch.float32}
        layers = {int(n.split(".")[2]) for n in obs["optim_names_0"] if n.startswith("model.layers.")}
        assert layers == set(obs["active_0"])


def test_switch_frees_leaving_state_and_keeps_always_on_state(lisa_run):
    for obs in lisa_run:
        assert obs["state_bytes_1"] == obs["expected_bytes_1"]
        # storage accounting sees exactly the difference between what entered and what left
        assert obs["tracked_delta"] == obs["state_bytes_1"] - obs["state_bytes_0"]
        # leaving state is freed before entering state is allocated: the switch costs no extra peak
        assert obs["switch_peak_over_end"] == 0
        assert obs["always_on_kept"]
        assert obs["num_leaving_tensors"] > 0 and obs["leaving_freed"]


def _desync_worker(rank: int, world_size: int, output_dir: str) -> str:
    trainer = start_trainer(tiny_config(output_dir))
    if rank == 1:
        trainer.core.sampler.strategy.seed = 12345
    try:
        trainer.core.switch(0)
    except RankDisagreementError as e:
        return str(e)
    return "no error"


def test_disagreeing_ranks_fail_with_an_error_naming_them(tmp_path):
    messages = run_distributed(_desync_worker, 2, output_dir=str(tmp_path))
    for message in messages:
        assert "ranks disagree on the active layers for step 0" in message
        assert "rank 1:" in message and "ranks [1] differ from rank 0" in message


def _traffic_worker(rank: int, world_size: int, output_dir: str, method: str, optim: str) -> dict:
    from lisa_dist.sizing.plan import ModelShape, plan_communication

    config = tiny_config(output_dir, method=method, optim={"name": optim, "lr": 1e-3}, train={"micro_batch_size": 4})
    trainer = start_trainer(config)
    sent = {"all_gather": 0, "reduce_scatter": 0}
    originals = {"all_gather": getattr(dist, ALL_GATHER), "reduce_scatter": getattr(dist, REDUCE_SCATTER)}

    def counting(kind, original):
        def call(*args, **kwargs):
            output = kwargs.get("output", args[0] if args else None)
            input = kwargs.get("input", args[1] if len(args) > 1 else None)
            full = output if kind == "all_gather" else input
            sent[kind] += full.numel() * full.element_size() * (world_size - 1) // world_size
            return original(*args, **kwargs)
        return call

    trainer.train_step(0)  # lazy initialization
    setattr(dist, ALL_GATHER, counting("all_gather", originals["all_gather"]))
    setattr(dist, REDUCE_SCATTER, counting("reduce_scatter", originals["reduce_scatter"]))
    trainer.train_step(1)
    return {"sent": sent, "planned": plan_communication(config, ModelShape.of(config), world_size)}


@pytest.mark.parametrize("method, optim", [("lisa", "adamw"), ("full", "lomo")])
def test_plan_counts_the_bytes_each_rank_sends(tmp_path, method, optim):
    result = run_distributed(_traffic_worker, 2, output_dir=str(tmp_path), method=method, optim=optim)[0]
    sent, planned = result["sent"], result["planned"]
    assert sent["all_gather"] > 0 and sent["reduce_scatter"] > 0
    assert sent["all_gather"] == pytest.approx(planned["all_gather"], rel=0.02)
    assert sent["reduce_scatter"] == pytest.approx(planned["reduce_scatter"], rel=0.02)
