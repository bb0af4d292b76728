"""LOMO and AdaLomo on FSDP2 with 2 gloo ranks, against post-backward SGD and a reference AdaLomo."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.data import GlobalBatches, build_sequences, load_examples
from lisa_dist.errors import FusedPathError
from tests.helpers import (PARITY_ADALOMO_EPS1, REDUCTION_ROUNDING, assert_weights_close, full_weights, parity_atol,
                           run_distributed, start_trainer, tiny_config)

STEPS = 4
FULL = dict(method="full", train={"micro_batch_size": 4})  # global 8 on 2 ranks: no accumulation


def _run(config, steps=STEPS):
    trainer = start_trainer(config)
    records = [trainer.train_step(s) for s in range(steps)]
    return trainer, records


def _pairs_worker(rank: int, world_size: int, output_dir: str) -> dict:
    out = {}
    micro = 8 // world_size
    for key, optim in {
        "lomo": {"name": "lomo", "lr": 0.05, "max_grad_norm": 0.0, "weight_decay": 0.1},
        "sgd": {"name": "sgd", "lr": 0.05, "max_grad_norm": 0.0, "weight_decay": 0.1},
        "lomo_precheck_clip": {"name": "lomo", "lr": 0.05, "max_grad_norm": 0.5, "fused_precheck": True,
                               "clip_grad_value": 0.01},
        "sgd_clip": {"name": "sgd", "lr": 0.05, "max_grad_norm": 0.5, "clip_grad_value": 0.01},
        "adalomo": {"name": "adalomo", "lr": 0.01, "max_grad_norm": 0.0, "weight_decay": 0.1,
                    "adalomo_eps": [PARITY_ADALOMO_EPS1, 1e-3]},
    }.items():
        trainer, records = _run(tiny_config(output_dir, method="full", train={"micro_batch_size": micro},
                                            optim=optim))
        out[key] = {"weights": full_weights(trainer), "losses": [r["loss"] for r in records], "optim": optim,
                    "state_bytes": trainer.core.optimizer.state_bytes(),
                    "grad_norms": [r["grad_norm"] for r in records]}
        trainer.core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pairs"))
    return {"two": run_distributed(_pairs_worker, 2, output_dir=out)[0],
            "one": run_distributed(_pairs_worker, 1, output_dir=out)[0]}


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_full_lomo_equals_full_sgd_without_momentum(pairs):
    lomo, sgd = pairs["two"]["lomo"], pairs["two"]["sgd"]
    # The same reduced gradients and the same update, applied inside backward instead of after it.
    assert lomo["losses"] == sgd["losses"]
    _equal(lomo["weights"], sgd["weights"])


def test_lomo_keeps_no_optimizer_state(pairs):
    assert pairs["two"]["lomo"]["state_bytes"] == 0


def test_precheck_norm_clip_and_value_clip_equal_post_backward_sgd(pairs):
    lomo, sgd = pairs["two"]["lomo_precheck_clip"], pairs["two"]["sgd_clip"]
    # The checking backward sums the squared shard norms in its own order: a norm's rounding, 2 * 2^-14.
    assert lomo["grad_norms"] == pytest.approx(sgd["grad_norms"], rel=2 * REDUCTION_ROUNDING, abs=0)
    assert max(sgd["grad_norms"]) > 0.5  # the norm clip was active
    # The clip coefficient differs by that rounding; the value clamp is 1-Lipschitz (tests.helpers.parity_atol).
    atol = parity_atol(lomo["optim"], STEPS, max(lomo["grad_norms"] + sgd["grad_norms"]))
    assert_weights_close(lomo["weights"], sgd["weights"], atol)


def test_one_rank_equals_two_ranks(pairs):
    for key in ("lomo", "adalomo"):
        one, two = pairs["one"][key], pairs["two"][key]
        atol = parity_atol(one["optim"], STEPS, max(one["grad_norms"] + two["grad_norms"]))
        assert_weights_close(one["weights"], two["weights"], atol)


def reference_adalomo(config, steps: int) -> dict[str, torch.Tensor]:
    """AdaLomo as published (arXiv 2310.10195, Algorithm 1), on full tensors in one process."""
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    sequences = build_sequences(load_examples(config.data.path, tokenizer), config.data.seq_len,
                                tokenizer.pad_token_id, pack=False)
    batches = GlobalBatches(sequences, 8, 8, 0, 1, config.seed)
    (eps1, eps2), lr, wd = config.optim.adalomo_eps, config.optim.lr, config.optim.weight_decay
    state: dict[str, dict[str, torch.Tensor]] = {}
    for step in range(1, steps + 1):
        (batch,) = batches.micro_batches(step - 1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).backward()
        beta2t = 1.0 - math.pow(step, -0.8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = p.grad
                sq = g * g + eps1
                s = state.setdefault(name, {})
                if p.dim() > 1:
                    row = s.setdefault("row", torch.zeros(p.shape[0]))
                    col = s.setdefault("col", torch.zeros(p.shape[1]))
                    row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1 - beta2t)
                    col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1 - beta2t)
                    r_factor = (row / row.mean()).rsqrt().unsqueeze(-1)
                    update = r_factor * col.rsqrt().unsqueeze(0) * g
                else:
                    v = s.setdefault("v", torch.zeros_like(p))
                    v.mul_(beta2t).add_(sq, alpha=1 - beta2t)
                    update = v.rsqrt() * g
                rms = update.pow(2).mean().sqrt()
                update = update / max(1.0, float(rms) / 1.0)
                alpha = lr * max(eps2, float(p.pow(2).mean().sqrt()))
                p.mul_(1 - alpha * wd)
                p.add_(update, alpha=-alpha)
                p.grad = None
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_adalomo_matches_the_published_update(pairs, tmp_path):
    run = pairs["two"]["adalomo"]
    config = tiny_config(tmp_path, optim=run["optim"])
    reference = reference_adalomo(config, STEPS)
    assert_weights_close(run["weights"], reference, parity_atol(run["optim"], STEPS, max(run["grad_norms"])))


def _guard_worker(rank: int, world_size: int, output_dir: str) -> dict:
    out = {}
    for key, optim in {"precheck": {"fused_precheck": True}, "one_pass": {}}.items():
        config = tiny_config(output_dir, method="lisa", lisa={"gamma": 2, "interval": 10},
                             train={"dtype": "bf16", "micro_batch_size": 2},
                             optim={"name": "lomo", "lr": 0.05, "max_grad_norm": 1.0, **optim})
        trainer = start_trainer(config)
        trainer.train_step(0)
        before = full_weights(trainer)
        layer = trainer.core.parts.layers[max(trainer.core.active_layers)]

        def poison(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.register_hook(lambda g: g.index_fill(-1, torch.tensor([0]), float("inf")))

        handle = layer.register_forward_hook(poison)
        record = trainer.train_step(1)
        handle.remove()
        after = full_weights(trainer)
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        finite = all(torch.isfinite(w).all() for w in after.values())
        healthy = trainer.train_step(2)
        out[key] = {"record": record, "changed": changed, "finite": finite, "healthy": healthy}
    return out


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    return run_distributed(_guard_worker, 2, output_dir=str(tmp_path_factory.mktemp("guard")))


def test_planted_inf_gradient_with_precheck_leaves_every_weight_unchanged(guarded):
    for rank in guarded:
        obs = rank["precheck"]
        assert obs["record"]["skipped"] and obs["record"]["skipped_steps"] == 1
        assert obs["changed"] == []
        assert not obs["healthy"]["skipped"] and obs["healthy"]["backward_passes"] == 2


def test_planted_inf_gradient_in_one_pass_never_reaches_a_weight(guarded):
    for rank in guarded:
        obs = rank["one_pass"]
        assert obs["finite"]
        assert obs["record"]["nonfinite_grad_shards"] > 0
        assert not any(n.startswith("model.embed_tokens") for n in obs["changed"])  # below the poison
        assert not obs["healthy"]["skipped"]


def _memory_worker(rank: int, world_size: int, output_dir: str) -> dict:
    trainer = start_trainer(tiny_config(output_dir, **FULL, optim={"name": "lomo", "lr": 0.01}))
    updater = trainer.core.stepper.hooks
    original = updater._on_grad
    live = []

    def measuring(name, param):
        storages = {}
        for p in trainer.core.model.parameters():
            g = trainer.core.engine.local_grad(p)
            if g is not None:
                storages[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
        live.append(sum(storages.values()))
        original(name, param)

    for handle in updater.handles:
        handle.remove()
    updater.handles = [trainer.core.engine.register_grad_hook(p, lambda p, n=n: measuring(n, p))
                       for n, p in trainer.core.model.named_parameters()]
    runs = []
    apply_many = trainer.core.optimizer.apply_many

    def recording(slots, grads, options, guard=False, grad_sqs=None):
        runs.append([id(slot.param) for slot in slots])
        return apply_many(slots, grads, options, guard, grad_sqs)

    trainer.core.optimizer.apply_many = recording
    trainer.train_step(0)
    engine = trainer.core.engine
    unit_of = {id(p): u for u, unit in enumerate(engine.grad_units()) for p in unit}
    numel = {id(p): p.numel() for p in trainer.core.model.parameters()}  # whole parameters: update_runs' sizes
    parts = trainer.core.parts
    units = [list(layer.parameters()) for layer in parts.layers]
    units.append([p for m in parts.embeddings for p in m.parameters()])
    units.append([*parts.norm.parameters(), *parts.head.parameters()])
    unit_bytes = [sum(trainer.core.engine.local_shard(p).numel() * 4 for p in unit) for unit in units]
    bypassed = None
    updater.remove()
    try:
        trainer.train_step(1)
    except FusedPathError as e:
        bypassed = str(e)
    return {"live": live, "units": unit_bytes, "bypassed": bypassed, "runs": [[numel[p] for p in run] for run in runs],
            "runs_in_one_unit": all(len({unit_of[pid] for pid in run}) == 1 for run in runs),
            "params": len(numel)}


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return run_distributed(_memory_worker, 2, output_dir=str(tmp_path_factory.mktemp("mem")))


def test_live_gradients_never_exceed_one_fsdp_unit(memory):
    for obs in memory:
        largest = max(obs["units"])
        assert max(obs["live"]) <= largest * 1.02  # FSDP2 pads each unit's flat buffer slightly
        assert max(obs["live"]) < sum(obs["units"]) / 2


def test_fused_updates_run_per_unit_in_runs_within_the_largest_shard(memory):
    for obs in memory:
        assert obs["runs_in_one_unit"]
        assert sum(len(run) for run in obs["runs"]) == obs["params"]
        assert len(obs["runs"]) < obs["params"]  # the tiny model's layers' small shards go together
        largest = max(max(run) for run in obs["runs"])
        assert all(len(run) == 1 or sum(run) <= largest for run in obs["runs"])


def _adalomo_batch_worker(rank: int, world_size: int, output_dir: str) -> dict:
    """A matrix cut mid-row (ZeRO-3's flat partitions), one cut on a row boundary, and a vector, each sharded
    over 2 ranks: every shard updated at once, one at a time, and the whole tensors in one process."""
    import torch.distributed as dist

    from lisa_dist.optim.rules import AdaLomo
    from lisa_dist.optim.shard_info import ShardInfo, local_shard_info

    dist.init_process_group("gloo")
    calls = []

    def reduce_sum(t):
        calls.append(t.numel())
        dist.all_reduce(t)

    generator = torch.Generator()
    shapes = [(7, 5), (6, 4), (9,)]
    # A clip threshold under the updates' RMS (about 1 at the first steps), so the update sums matter too.
    rule = AdaLomo((1e-3, 1e-3), -0.8, 0.5, 0.1)
    runs = {}
    for mode in ("together", "one_at_a_time", "whole"):
        generator.manual_seed(0)
        masters, grads, states, shards = [], [], [], []
        for shape in shapes:
            full, full_grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
            flat, numel = full.reshape(-1), full.numel()
            lo, hi = rank * -(-numel // 2), min(numel, (rank + 1) * -(-numel // 2))
            if mode == "whole":
                lo, hi, info = 0, numel, local_shard_info(full)
            else:
                info = ShardInfo(shape, lo, hi - lo, reduce_sum)
            masters.append(flat[lo:hi].clone())
            grads.append(full_grad.reshape(-1)[lo:hi].clone())
            states.append(rule.init_state(masters[-1] if mode != "whole" else full.clone(), info))
            shards.append(info)
        if mode == "whole":
            masters = [m.view(shape) for m, shape in zip(masters, shapes)]
            grads = [g.view(shape) for g, shape in zip(grads, shapes)]
        calls.clear()
        for step in (1, 2):
            step_grads = [g.clone() for g in grads]
            if mode == "one_at_a_time":
                for m, g, s, info in zip(masters, step_grads, states, shards):
                    rule.update(m, g, s, step, 0.01, info)
            else:
                rule.update_many(masters, step_grads, states, [step] * 3, 0.01, shards)
        if mode == "whole":  # this rank's slices of the whole result
            masters = [m.reshape(-1)[rank * -(-m.numel() // 2):(rank + 1) * -(-m.numel() // 2)] for m in masters]
        runs[mode] = {"masters": masters, "states": states, "collectives": len(calls)}
    return runs


def test_adalomo_statistics_of_many_shards_go_in_two_collectives_with_the_same_numbers():
    for rank in run_distributed(_adalomo_batch_worker, 2, output_dir=""):
        together, alone, whole = rank["together"], rank["one_at_a_time"], rank["whole"]
        # Sums of two ranks are the same whether reduced alone or in a longer vector: bit for bit.
        for a, b in zip(together["masters"] + [t for s in together["states"] for t in s.values()],
                        alone["masters"] + [t for s in alone["states"] for t in s.values()]):
            assert torch.equal(a, b)
        assert together["collectives"] == 2 * 2  # two per step
        assert alone["collectives"] == 2 * (2 + 2 + 1)  # two per matrix and one per vector, per step
        # Against the whole tensors: only the order of the statistics' sums differs (at most 35 terms in
        # fp32, relative 35 * 2^-24 = 2.1e-6 in the update; the step is lr * RMS(w) ~ 0.01 of weights ~1, so
        # about 2e-8 absolute per step, below the weights' own rounding of 6e-8). 2 steps: 1e-6 is 5x that.
        for a, b in zip(together["masters"], whole["masters"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_bypassed_fused_path_fails_loudly(memory):
    for obs in memory:
        assert obs["bypassed"] is not None and "did not run for" in obs["bypassed"]


def _accumulation_worker(rank: int, world_size: int, output_dir: str) -> dict:
    out = {}
    for name in ("lomo", "sgd"):
        config = tiny_config(output_dir, method="lisa", lisa={"gamma": 2, "interval": 2},
                             train={"micro_batch_size": 1}, optim={"name": name, "lr": 0.05, "max_grad_norm": 0.0})
        trainer, records = _run(config)
        out[name] = {"weights": full_weights(trainer), "losses": [r["loss"] for r in records],
                     "accumulation": trainer.batches.accumulation_steps}
    return out


def test_lisa_lomo_accumulates_active_gradients_and_equals_lisa_sgd(tmp_path):
    ranks = run_distributed(_accumulation_worker, 2, output_dir=str(tmp_path))
    lomo, sgd = ranks[0]["lomo"], ranks[0]["sgd"]
    assert lomo["accumulation"] == 4
    assert lomo["losses"] == sgd["losses"]
    _equal(lomo["weights"], sgd["weights"])


PAIRS = [(method, optim) for method in ("full", "lisa") for optim in ("adamw", "sgd", "lomo", "adalomo")]
LR = {"adamw": 3e-3, "sgd": 0.15, "lomo": 0.15, "adalomo": 0.05}


def _every_pair_worker(rank: int, world_size: int, output_dir: str) -> dict:
    out = {}
    for method, optim in PAIRS:
        config = tiny_config(output_dir, method=method, lisa={"gamma": 2, "interval": 3},
                             train={"dtype": "bf16", "micro_batch_size": 4},
                             optim={"name": optim, "lr": LR[optim], "max_grad_norm": 1.0})
        # 8 steps: measured here, each pair's loss fell by 0.35 to 0.95 (first 3 against last 3); 0.1 is asserted
        trainer, records = _run(config, steps=8)
        out[f"{method}+{optim}"] = [r["loss"] for r in records]
        trainer.core.stepper.hooks.remove()
    return out


def test_every_method_and_optimizer_pair_trains_with_the_loss_falling(tmp_path):
    losses = run_distributed(_every_pair_worker, 2, output_dir=str(tmp_path))[0]
    assert len(losses) == 8
    for pair, curve in losses.items():
        first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
        assert last < first - 0.1, f"{pair}: {curve}"


def _fp16_worker(rank: int, world_size: int, output_dir: str) -> dict:
    out = {}
    for optim in ("adamw", "lomo"):
        config = tiny_config(output_dir, method="full", train={"dtype": "fp16", "micro_batch_size": 4,
                                                               "loss_scale": 2.0 ** 24, "loss_scale_window": 2},
                             optim={"name": optim, "lr": 1e-3 if optim == "adamw" else 0.05})
        trainer = start_trainer(config)
        steps = []
        for step in range(14):
            before = full_weights(trainer)
            record = trainer.train_step(step)
            after = full_weights(trainer)
            unchanged = all(torch.equal(before[n], after[n]) for n in before)
            steps.append({"skipped": record["skipped"], "scale": record["loss_scale"], "unchanged": unchanged,
                          "finite": all(torch.isfinite(w).all() for w in after.values())})
        out[optim] = steps
        trainer.core.stepper.hooks.remove()
    return out


def test_fp16_overflow_skips_the_step_untouched_and_the_scale_recovers(tmp_path):
    ranks = run_distributed(_fp16_worker, 2, output_dir=str(tmp_path))
    for optim, steps in ranks[0].items():
        skipped = [s for s in steps if s["skipped"]]
        assert skipped and all(s["unchanged"] for s in skipped), optim
        assert all(s["finite"] for s in steps), optim
        trained = [s for s in steps if not s["skipped"]]
        assert trained and not any(s["unchanged"] for s in trained), optim
        scales = [s["scale"] for s in steps]
        assert scales[0] == 2.0 ** 23  # halved by the first overflow
        assert any(b == 2 * a for a, b in zip(scales, scales[1:])), f"{optim}: the scale never grew back {scales}"
