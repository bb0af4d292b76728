"""The router's load-balancing loss of mixture-of-experts models, on 2 gloo ranks with 2 micro-batches each,
against one process that adds the coefficient times the mean of the micro-batches' router losses to the mean
token loss of the global batch; and routers kept frozen while their layers train (model.freeze_routers)."""

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from lisa_dist.data import GlobalBatches, build_sequences, load_examples
from tests.families import routed_counts, write_family
from tests.helpers import (assert_weights_close, engine_weights, parity_atol, run_distributed, start_trainer,
                           tiny_config)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
STEPS = 2
SGD = {"name": "sgd", "lr": 0.2, "max_grad_norm": 0.0}
# Mixtral's coefficient from lisa_dist's key; Qwen2-MoE's from its own config (output_router_logits).
RUNS = {"mixtral": {"router_aux_loss_coef": 0.2}, "qwen2_moe": {}}
MODEL_COEF = 0.2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_router")
    out = {family: write_family(family, root / family) for family in RUNS}
    path = out["qwen2_moe"] / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "output_router_logits": True, "router_aux_loss_coef": MODEL_COEF}))
    return {family: str(d) for family, d in out.items()}


def _worker(rank: int, world_size: int, dirs: dict[str, str], engine: str, output_dir: str) -> dict:
    out = {}
    for family, model in RUNS.items():
        config = tiny_config(f"{output_dir}/{engine}/{family}", method="full", engine={"name": engine},
                             model={"path": dirs[family], **model}, optim=SGD)
        trainer = start_trainer(config)
        records = [trainer.train_step(step) for step in range(STEPS)]
        out[family] = {"weights": engine_weights(trainer), "records": records,
                       "kernel": trainer.core.model.config._experts_implementation}
        trainer.core.stepper.hooks.remove()
    config = tiny_config(f"{output_dir}/{engine}/eager", method="full", engine={"name": engine}, optim=SGD,
                         model={"path": dirs["mixtral"], "experts_implementation": "eager", **RUNS["mixtral"]})
    trainer = start_trainer(config)
    out["eager"] = {"records": [trainer.train_step(step) for step in range(STEPS)],
                    "weights": engine_weights(trainer), "kernel": trainer.core.model.config._experts_implementation}
    trainer.core.stepper.hooks.remove()
    config = tiny_config(f"{output_dir}/{engine}/checkpointed", method="full", engine={"name": engine}, optim=SGD,
                         model={"path": dirs["mixtral"], "activation_checkpointing": True, **RUNS["mixtral"]})
    trainer = start_trainer(config)
    out["checkpointed"] = trainer.train_step(0)
    trainer.core.stepper.hooks.remove()
    config = tiny_config(f"{output_dir}/{engine}/frozen", lisa={"gamma": 2, "interval": 2}, optim=SGD,
                         engine={"name": engine}, model={"path": dirs["mixtral"], "freeze_routers": True})
    trainer = start_trainer(config)
    records = [trainer.train_step(step) for step in range(STEPS)]
    out["frozen"] = {"weights": engine_weights(trainer), "active": records[-1]["active_layers"]}
    trainer.core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def runs(dirs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("moe_router_runs"))
    return {engine: run_distributed(_worker, 2, dirs=dirs, engine=engine, output_dir=out)[0]
            for engine in ("fsdp2", "zero3")}


def _reference(directory: str, coef: float, output_dir) -> tuple[dict[str, torch.Tensor], list[float], list]:
    """SGD on mean token loss + coef x mean router loss over the same micro-batches, in one process; also each
    step's expert counts per layer, with the near-tied tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    balance = sys.modules[type(model).__module__].load_balancing_loss_func
    config = tiny_config(output_dir, model={"path": directory})
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    sequences = build_sequences(load_examples(config.data.path, tokenizer), config.data.seq_len,
                                tokenizer.pad_token_id, pack=False)
    ranks = [GlobalBatches(sequences, 8, 2, rank, 2, config.seed) for rank in (0, 1)]
    aux_means, routed = [], []
    for step in range(STEPS):
        micro = [b for r in ranks for b in r.micro_batches(step)]
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        objective, auxes, counts, ties = 0.0, [], 0, 0
        for batch in micro:
            out = model(input_ids=batch["input_ids"], output_router_logits=True)
            batch_counts, batch_ties = routed_counts(out.router_logits, batch["attention_mask"],
                                                     model.num_experts_per_tok)
            counts, ties = torch.tensor(batch_counts) + counts, torch.tensor(batch_ties) + ties
            ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                 ignore_index=-100, reduction="sum")
            aux = balance(out.router_logits, model.num_experts, model.num_experts_per_tok, batch["attention_mask"])
            auxes.append(aux)
            objective = objective + ce / targets + coef * aux / len(micro)
        objective.backward()
        aux_means.append(float(sum(auxes).detach()) / len(micro))
        routed.append((counts, ties))
        with torch.no_grad():
            for p in model.parameters():
                p -= SGD["lr"] * p.grad
                p.grad = None
    return {n: p.detach().clone() for n, p in model.named_parameters()}, aux_means, routed


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
@pytest.mark.parametrize("family", list(RUNS))
def test_the_router_loss_is_added_as_one_process_adds_it(runs, dirs, family, engine, tmp_path):
    coef = RUNS[family].get("router_aux_loss_coef", MODEL_COEF)
    obs = runs[engine][family]
    reference, aux_means, _ = _reference(dirs[family], coef, tmp_path)
    atol = parity_atol(SGD, STEPS, max(r["grad_norm"] for r in obs["records"]))
    assert_weights_close(obs["weights"], reference, atol)
    # The logged aux_loss is the mean over the global batch's micro-batches: a sum of 4 fp32 values in
    # another order, plus the router logits' own rounding in another reduction order (tests.helpers).
    assert [r["aux_loss"] for r in obs["records"]] == pytest.approx(aux_means, rel=4 * 2.0 ** -14)
    without, _, _ = _reference(dirs[family], 0.0, tmp_path)
    moved = max(float((without[n] - reference[n]).abs().max()) for n in reference)
    assert moved > 10 * atol, "the router loss changes the update beyond the parity bound"


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
@pytest.mark.parametrize("family", list(RUNS))
def test_tokens_routed_to_each_expert_are_counted_as_one_process_counts_them(runs, dirs, family, engine, tmp_path):
    """Over 2 ranks x 2 micro-batches of right-padded sequences, padding left out: per layer and expert, the
    count one process makes from its router logits, up to the tokens near a tie at the top-k boundary."""
    coef = RUNS[family].get("router_aux_loss_coef", MODEL_COEF)
    _, _, routed = _reference(dirs[family], coef, tmp_path)
    for record, (counts, ties) in zip(runs[engine][family]["records"], routed):
        observed = torch.tensor([record["expert_tokens"][str(layer)] for layer in range(len(counts))])
        assert ((observed - counts).abs() <= ties[:, None]).all(), (observed, counts, ties)
        assert torch.equal(observed.sum(dim=1), counts.sum(dim=1))


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_both_experts_implementations_train_alike(runs, engine):
    """model.experts_implementation=eager against the default (grouped matrix products): the same update within
    the rounding of another summation order (tests.helpers.parity_atol), the same routing at the first step."""
    grouped, eager = runs[engine]["mixtral"], runs[engine]["eager"]
    assert (grouped["kernel"], eager["kernel"]) == ("grouped_mm", "eager")
    atol = parity_atol(SGD, STEPS, max(r["grad_norm"] for r in grouped["records"] + eager["records"]))
    assert_weights_close(eager["weights"], grouped["weights"], atol)
    assert eager["records"][0]["expert_tokens"] == grouped["records"][0]["expert_tokens"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_recomputed_forwards_are_not_counted_again(runs, engine):
    """With activation checkpointing each layer's forward runs again in backward: the counts stay those of one
    forward (the same first step without checkpointing)."""
    assert runs[engine]["checkpointed"]["expert_tokens"] == runs[engine]["mixtral"]["records"][0]["expert_tokens"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_frozen_routers_stay_while_their_layers_train(runs, dirs, engine):
    obs = runs[engine]["frozen"]
    start = transformers.AutoModelForCausalLM.from_pretrained(dirs["mixtral"]).state_dict()
    for layer in obs["active"]:
        prefix = f"model.layers.{layer}.mlp."
        assert torch.equal(obs["weights"][prefix + "gate.weight"], start[prefix + "gate.weight"])
        assert not torch.equal(obs["weights"][prefix + "experts.down_proj"], start[prefix + "experts.down_proj"])
