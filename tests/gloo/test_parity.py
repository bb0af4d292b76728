"""Distributed LISA against a plain single-process reference loop, and 1 rank against 2 ranks."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.data import GlobalBatches, build_sequences, load_examples
from lisa_dist.sampler import sample_active_layers
from tests.helpers import (LOSS_RTOL, PARITY_EPS, assert_weights_close, full_weights, parity_atol, run_distributed,
                           start_trainer, tiny_config, tiny_start_weights)

STEPS, GAMMA, INTERVAL = 7, 2, 3
OVERRIDES = dict(max_steps=STEPS, lisa={"gamma": GAMMA, "interval": INTERVAL},
                 optim={"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "max_grad_norm": 1.0, "eps": PARITY_EPS})


def _train_worker(rank: int, world_size: int, output_dir: str, micro_batch_size: int) -> dict:
    config = tiny_config(output_dir, **OVERRIDES, train={"micro_batch_size": micro_batch_size})
    trainer = start_trainer(config)
    records = [trainer.train_step(step) for step in range(STEPS)]
    return {"weights": full_weights(trainer), "losses": [r["loss"] for r in records],
            "active": [r["active_layers"] for r in records], "grad_norms": [r["grad_norm"] for r in records]}


def reference_lisa(config) -> dict:
    """LISA as the paper describes it, on one process with torch.optim.AdamW and no sharding."""
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    model.train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    sequences = build_sequences(load_examples(config.data.path, tokenizer), config.data.seq_len,
                                tokenizer.pad_token_id, pack=False)
    batches = GlobalBatches(sequences, config.train.global_batch_size, config.train.global_batch_size, 0, 1,
                            config.seed)
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    layers = model.model.layers
    losses, active_log = [], []
    active: tuple[int, ...] = ()
    for step in range(STEPS):
        if step % INTERVAL == 0:
            active = sample_active_layers(config.seed, step // INTERVAL, len(layers), GAMMA)
            for i, layer in enumerate(layers):
                layer.requires_grad_(i in active)
                if i not in active:
                    for p in layer.parameters():
                        optimizer.state.pop(p, None)  # LISA frees the state of layers that leave
        (batch,) = batches.micro_batches(step)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:].flatten()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels, ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        active_log.append(sorted(active))
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses,
            "active": active_log}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    return {
        "one_rank": run_distributed(_train_worker, 1, output_dir=out, micro_batch_size=2)[0],
        "two_ranks": run_distributed(_train_worker, 2, output_dir=out, micro_batch_size=2),
        "reference": reference_lisa(tiny_config(out, **OVERRIDES)),
    }


START = tiny_start_weights()


def _assert_weights_close(a: dict, b: dict, grad_norms: list[float]) -> None:
    assert_weights_close(a, b, parity_atol(OVERRIDES["optim"], STEPS, max(grad_norms)))


def test_two_ranks_match_the_single_process_reference_lisa(runs):
    ref, dist_run = runs["reference"], runs["two_ranks"][0]
    assert dist_run["active"] == ref["active"]
    assert len({tuple(a) for a in ref["active"]}) > 1, "the run must cross a layer switch"
    torch.testing.assert_close(torch.tensor(dist_run["losses"]), torch.tensor(ref["losses"]), rtol=LOSS_RTOL, atol=0)
    _assert_weights_close(dist_run["weights"], ref["weights"], dist_run["grad_norms"])


def test_one_rank_equals_two_ranks(runs):
    one, two = runs["one_rank"], runs["two_ranks"]
    assert all(torch.equal(two[0]["weights"][n], two[1]["weights"][n]) for n in two[0]["weights"])  # all-gathered
    torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(two[0]["losses"]), rtol=LOSS_RTOL, atol=0)
    _assert_weights_close(one["weights"], two[0]["weights"], one["grad_norms"] + two[0]["grad_norms"])


def test_training_moves_the_weights(runs):
    moved = [n for n, w in runs["two_ranks"][0]["weights"].items() if not torch.equal(w, START[n])]
    assert "lm_head.weight" in moved and "model.embed_tokens.weight" in moved


def _bf16_accumulation_worker(rank: int, world_size: int, output_dir: str, micro_batch_size: int) -> dict:
    config = tiny_config(output_dir, method="full", train={"dtype": "bf16", "micro_batch_size": micro_batch_size},
                         optim={"name": "adamw", "lr": 1e-3, "max_grad_norm": 0.0})
    trainer = start_trainer(config)
    record = trainer.train_step(0)
    return {"grad_norm": record["grad_norm"], "accumulation": trainer.batches.accumulation_steps}


def test_bf16_accumulated_micro_batches_give_the_whole_batch_gradient(tmp_path):
    """Four micro-batches of one give the gradient of one micro-batch of four (bf16 rounding aside)."""
    split = run_distributed(_bf16_accumulation_worker, 2, output_dir=str(tmp_path), micro_batch_size=1)[0]
    whole = run_distributed(_bf16_accumulation_worker, 2, output_dir=str(tmp_path), micro_batch_size=4)[0]
    assert (split["accumulation"], whole["accumulation"]) == (4, 1)
    # Each micro-batch's gradient element is rounded to bf16 (unit roundoff 2^-9) before the fp32 sum, the
    # whole batch's once: at most 2 * 2^-9 relative per element, so for the norm; twice that for the bf16
    # activations and logits they come from, whose products run over other shapes.
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=4 * 2.0 ** -9, abs=0)


def _offload_worker(rank: int, world_size: int, output_dir: str, use_offload: bool, engine: str) -> dict:
    import lisa_dist.offload as offload

    offload.MIN_OFFLOAD_BYTES = 0  # the tiny model's activations are far below the 1 MiB threshold
    copies = []
    original = offload.to_host
    offload.to_host = lambda t, host, non_blocking=False: copies.append(t.shape) or original(t, host, non_blocking)
    config = tiny_config(output_dir, max_steps=STEPS, lisa=OVERRIDES["lisa"], train={"dtype": "bf16"},
                         engine={"name": engine},
                         model={"path": str(TINY_MODEL_DIR), "activation_checkpointing": True,
                                "activation_offload": use_offload},
                         optim={**OVERRIDES["optim"], "offload_state": use_offload})
    trainer = start_trainer(config)
    records = [trainer.train_step(step) for step in range(STEPS)]
    weights = full_weights(trainer) if engine == "fsdp2" else trainer.core.engine.full_state_dict()
    return {"weights": weights, "losses": [r["loss"] for r in records], "copies": len(copies)}


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_offloaded_activations_and_optimizer_state_train_bit_for_bit_like_resident_ones(tmp_path, engine):
    """Offload on a CPU run copies host to host; what it must not change is any number."""
    plain = run_distributed(_offload_worker, 2, output_dir=str(tmp_path), use_offload=False, engine=engine)[0]
    offloaded = run_distributed(_offload_worker, 2, output_dir=str(tmp_path), use_offload=True, engine=engine)[0]
    assert plain["copies"] == 0 and offloaded["copies"] > STEPS * 8  # at least each layer input, each step
    assert plain["losses"] == offloaded["losses"]
    for name, weight in plain["weights"].items():
        assert torch.equal(weight, offloaded["weights"][name]), name
