"""`lisa.unit=expert`: a mixture-of-experts model's routed experts sampled one by one, with each layer's rest
(attention, router, shared experts, norms) as one more unit. On 2 ranks, both engines, against one process:
only the drawn units' weights change (an expert's rows, a layer's rest), optimizer state exists for exactly the
active experts' rows of each rank's shard, AdamW's and AdaLomo's (inside backward) weights equal one process's
within the reduction-order bound, and a run resumed mid-interval continues bit for bit."""

import os
from pathlib import Path

import pytest
import torch

from lisa_dist.config import load_config
from lisa_dist.optim.sharded_optimizer import expert_key
from tests.families import routed_counts, write_family
from tests.helpers import (COMMON, PARITY_ADALOMO_EPS1, PARITY_EPS, REPO, ZERO3, assert_same_final,
                           assert_weights_close, engine_weights, metrics, parity_atol, run_distributed, start_trainer,
                           tiny_config)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
STEPS = 4
FAMILY = "qwen2_moe"  # shared experts beside the routed ones
EXPERTS, LAYERS = 8, 4
OPTIMS = {"adamw": {"name": "adamw", "lr": 1e-2, "max_grad_norm": 1.0, "eps": PARITY_EPS},
          "adalomo": {"name": "adalomo", "lr": 1e-2, "max_grad_norm": 0.0, "adalomo_eps": [PARITY_ADALOMO_EPS1, 1e-3]}}
# Per layer its rest, then its experts: the rests drawn often, so both kinds of unit train in a few steps.
WEIGHTS = [6.0] + [1.0] * EXPERTS
LISA = {"gamma": 5, "interval": 2, "unit": "expert", "strategy": "weights", "layer_weights": WEIGHTS * LAYERS}


def _worker(rank: int, world_size: int, model_dir: str, engine: str, optim: str, output_dir: str) -> dict:
    config = tiny_config(f"{output_dir}/{engine}{world_size}{optim}", engine={"name": engine}, lisa=LISA,
                         model={"path": model_dir}, optim=OPTIMS[optim],
                         )
    trainer = start_trainer(config)
    core = trainer.core
    start = engine_weights(trainer)
    records, state = [], []
    for step in range(STEPS):
        records.append(trainer.train_step(step))
        parts = {key: slot for key, slot in core.optimizer.slots.items() if slot.part is not None}
        elements = sum(t.numel() for slot in parts.values() for t in slot.state.values())
        state.append({"keys": sorted(parts), "elements": elements})
    routed = {name for name, p in core.model.named_parameters() if any(p is q for u in core.units for q in u.routed)}
    out = {"start": start, "end": engine_weights(trainer), "records": records, "state": state,
           "routed": sorted(routed), "units": [u.name for u in core.units]}
    core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(write_family(FAMILY, tmp_path_factory.mktemp("expert_units") / "model"))


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("expert_runs"))
    out = {}
    for optim in OPTIMS:
        for engine in ("fsdp2", "zero3"):
            out[engine, optim] = run_distributed(_worker, 2, model_dir=model_dir, engine=engine, optim=optim,
                                                 output_dir=root)
        out["one", optim] = run_distributed(_worker, 1, model_dir=model_dir, engine="fsdp2", optim=optim,
                                            output_dir=root)
    return out


def _layer(name: str) -> str:
    return name.split(".layers.")[1].split(".")[0]


CASES = [(engine, optim) for optim in OPTIMS for engine in ("fsdp2", "zero3")]


@pytest.mark.parametrize("engine, optim", CASES)
def test_only_drawn_units_change_and_the_rest_stays_bit_identical(runs, engine, optim):
    obs = runs[engine, optim][0]
    drawn = {name for r in obs["records"] for name in r["active_blocks"]}
    assert obs["units"][:EXPERTS + 1] == ["0", *(f"0.e{e}" for e in range(EXPERTS))]
    assert any(".e" in name for name in drawn) and any(".e" not in name for name in drawn)
    for name, start in obs["start"].items():
        if ".layers." not in name:
            continue
        if name in obs["routed"]:
            for e in range(EXPERTS):
                same = torch.equal(start[e], obs["end"][name][e])
                assert same == (f"{_layer(name)}.e{e}" not in drawn), f"{name} expert {e}"
        else:
            assert torch.equal(start, obs["end"][name]) == (_layer(name) not in drawn), name


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_optimizer_state_covers_exactly_the_active_experts_rows(runs, engine):
    """Summed over ranks, the routed parameters' AdamW state is two values per element of the active experts
    (each rank holding its shard's part of them), with a slot per active expert on every rank."""
    ranks = runs[engine, "adamw"]
    per_expert = {name: ranks[0]["start"][name][0].numel() for name in ranks[0]["routed"]}
    for step, record in enumerate(ranks[0]["records"]):
        experts = [unit.split(".e") for unit in record["active_blocks"] if ".e" in unit]
        expected = sum(2 * size for layer, _ in experts for name, size in per_expert.items() if _layer(name) == layer)
        assert sum(rank["state"][step]["elements"] for rank in ranks) == expected, step
        keys = sorted(expert_key(name, int(e)) for layer, e in experts for name in per_expert if _layer(name) == layer)
        assert all(rank["state"][step]["keys"] == keys for rank in ranks), step


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_two_ranks_on_either_engine_equal_one_process(runs, optim):
    one = runs["one", optim][0]
    for engine in ("fsdp2", "zero3"):
        two = runs[engine, optim][0]
        assert [r["active_blocks"] for r in one["records"]] == [r["active_blocks"] for r in two["records"]]
        norms = [r["grad_norm"] for run in (one, two) for r in run["records"]]
        assert_weights_close(two["end"], one["end"], parity_atol(OPTIMS[optim], STEPS, max(norms)))


def _resume_jobs(rank: int, world_size: int, root: str, model_dir: str) -> None:
    weights = ",".join(str(w) for w in WEIGHTS * LAYERS)
    for engine, extra in (("fsdp2", []), ("zero3", ZERO3)):
        args = [*COMMON, f"model.path={model_dir}", "lisa.unit=expert", "lisa.gamma=5", "lisa.strategy=weights",
                f"lisa.layer_weights=[{weights}]", "optim.lr=0.01", "max_steps=6", "save_every=3", *extra]
        straight = Path(root) / engine / "straight"
        for out, more in ((straight, []), (Path(root) / engine / "resumed", [f"resume={straight}/checkpoints/step_3"])):
            config = load_config(REPO / "configs" / "tiny.yaml", [*args, *more, f"output_dir={out}"])
            start_trainer(config).fit()


@pytest.fixture(scope="module")
def resumed(model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("expert_resume")
    run_distributed(_resume_jobs, 2, root=str(root), model_dir=model_dir)
    return root


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_a_run_resumed_mid_interval_continues_bit_for_bit(resumed, engine):
    """Step 3's checkpoint falls inside an interval of 2: the resumed run trains the same experts, with the
    optimizer state of their parts as the straight run had it."""
    a, b = metrics(resumed / engine / "straight"), metrics(resumed / engine / "resumed")
    assert [r["step"] for r in b] == [4, 5, 6]
    assert [(r["loss"], r["grad_norm"], r["active_blocks"]) for r in a[3:]] == \
        [(r["loss"], r["grad_norm"], r["active_blocks"]) for r in b]
    assert_same_final(resumed / engine / "straight", resumed / engine / "resumed")


RESHARD_OPTIMS = {"adamw": [f"optim.eps={PARITY_EPS}", "optim.max_grad_norm=1.0"],
                  "adalomo": ["optim.name=adalomo", "optim.max_grad_norm=0",
                              f"optim.adalomo_eps=[{PARITY_ADALOMO_EPS1},0.001]"]}


def _reshard_jobs(rank: int, world_size: int, root: str, model_dir: str, engine: str, save: bool) -> dict:
    """Each optimizer's expert parts as this rank holds them, after 3 steps and saving (`save`; with the final
    weights and gradient norms), or after loading 3 ZeRO-3 ranks' checkpoint into a run of `engine` here."""
    weights = ",".join(str(w) for w in WEIGHTS * LAYERS)
    out = {}
    for optim, extra in RESHARD_OPTIMS.items():
        args = [*COMMON, f"model.path={model_dir}", "lisa.unit=expert", "lisa.gamma=5", "lisa.strategy=weights",
                f"lisa.layer_weights=[{weights}]", "optim.lr=0.01", "max_steps=3", "save_every=3",
                "train.global_batch_size=12", *extra, *(ZERO3 if engine == "zero3" else ["train.dtype=fp32"])]
        run = Path(root) / optim / f"{'saved' if save else 'loaded'}_{engine}{world_size}"
        trainer = start_trainer(load_config(REPO / "configs" / "tiny.yaml", [*args, f"output_dir={run}"]))
        if save:
            trainer.fit()
        else:
            trainer.checkpointer.load(Path(root) / optim / "saved_zero33" / "checkpoints" / "step_3")
        parts = {key: {entry: t.clone() for entry, t in state.items()}
                 for key, state in trainer.core.optimizer.state_dict().items() if "#" in key}
        out[optim] = {"parts": parts}
        if save:
            out[optim] |= {"weights": engine_weights(trainer), "norms": [r["grad_norm"] for r in metrics(run)]}
        trainer.core.stepper.hooks.remove()
    return out


def _whole_experts(ranks: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Each expert's optimizer state assembled from every rank's parts (`name#e@start:end`); entries as long as
    the part are placed at its range, the others (the step, AdaLomo's statistics) are the same in every part."""
    whole: dict[str, dict[str, torch.Tensor]] = {}
    for parts in ranks:
        for key, state in parts.items():
            base, span = key.split("@")
            start, end = map(int, span.split(":"))
            entries = whole.setdefault(base, {})
            for entry, t in state.items():
                if t.dim() and t.numel() == end - start:
                    grown = entries.get(entry, torch.full((0,), float("nan"), dtype=t.dtype))
                    if grown.numel() < end:
                        grown = torch.cat([grown, torch.full((end - grown.numel(),), float("nan"), dtype=t.dtype)])
                    grown[start:end] = t
                    entries[entry] = grown
                else:
                    assert entry not in entries or torch.equal(entries[entry], t), (key, entry)
                    entries[entry] = t
    return whole


@pytest.fixture(scope="module")
def resharded(model_dir, tmp_path_factory) -> dict:
    """Trained and saved on 3 ZeRO-3 ranks, whose flat partitions cut experts, and in one process; the first
    checkpoint loaded on 2 ranks of either engine (whole experts on FSDP2, cut elsewhere on ZeRO-3) and in one
    process."""
    root = str(tmp_path_factory.mktemp("expert_reshard"))
    out = {"saved": run_distributed(_reshard_jobs, 3, root=root, model_dir=model_dir, engine="zero3", save=True),
           "one": run_distributed(_reshard_jobs, 1, root=root, model_dir=model_dir, engine="fsdp2", save=True)}
    for engine, world_size in (("fsdp2", 2), ("zero3", 2), ("fsdp2", 1)):
        out[engine, world_size] = run_distributed(_reshard_jobs, world_size, root=root, model_dir=model_dir,
                                                  engine=engine, save=False)
    return out


@pytest.mark.parametrize("optim", list(RESHARD_OPTIMS))
def test_three_zero3_ranks_cutting_experts_train_as_one_process(resharded, optim):
    saved = [rank[optim]["parts"] for rank in resharded["saved"]]
    assert any(not key.split("@")[1].startswith("0:") for rank in saved for key in rank), \
        "3 ZeRO-3 ranks cut no expert"
    three, one = resharded["saved"][0][optim], resharded["one"][0][optim]
    config = {"name": optim, "lr": 0.01, "eps": PARITY_EPS, "max_grad_norm": 1.0 if optim == "adamw" else 0.0,
              "adalomo_eps": [PARITY_ADALOMO_EPS1, 1e-3]}
    assert_weights_close(three["weights"], one["weights"], parity_atol(config, 3, max(three["norms"] + one["norms"])))


@pytest.mark.parametrize("optim", list(RESHARD_OPTIMS))
@pytest.mark.parametrize("engine, world_size", [("fsdp2", 2), ("zero3", 2), ("fsdp2", 1)])
def test_expert_state_reshards_to_another_world_size_and_engine(resharded, optim, engine, world_size):
    expected = _whole_experts([rank[optim]["parts"] for rank in resharded["saved"]])
    loaded = _whole_experts([rank[optim]["parts"] for rank in resharded[engine, world_size]])
    assert sorted(loaded) == sorted(expected) and expected
    for base, entries in expected.items():
        assert sorted(loaded[base]) == sorted(entries), base
        for entry, t in entries.items():
            assert not t.isnan().any() and torch.equal(loaded[base][entry], t), (base, entry)


def _routing_worker(rank: int, world_size: int, model_dir: str, engine: str, output_dir: str) -> dict:
    """The routing strategy's scores after the first step, and the same tokens counted from the routers' logits
    (their top-k, padding left out) in forwards of this test's own, summed over ranks."""
    from lisa_dist.distributed import sum_over_ranks

    config = tiny_config(f"{output_dir}/routing_{engine}{world_size}", engine={"name": engine},
                         lisa={"gamma": 5, "interval": 2, "unit": "expert", "strategy": "routing"},
                         model={"path": model_dir}, optim=OPTIMS["adamw"])
    trainer = start_trainer(config)
    core = trainer.core
    with core.values.real_tensors():
        batches = trainer.batches.micro_batches(0)
    counts, ties = torch.zeros(LAYERS, EXPERTS, dtype=torch.float64), torch.zeros(LAYERS, dtype=torch.float64)
    core.model.eval()
    with torch.no_grad():
        for batch in batches:
            out = core.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_router_logits=True, use_cache=False)
            batch_counts, batch_ties = routed_counts(out.router_logits, batch["attention_mask"],
                                                     core.model.config.num_experts_per_tok)
            counts += torch.tensor(batch_counts, dtype=torch.float64)
            ties += torch.tensor(batch_ties, dtype=torch.float64)
    core.engine.after_forward_only()
    core.model.train()
    totals = sum_over_ranks(torch.cat([counts.flatten(), ties]), core.runtime.device)
    counts, ties = totals[:LAYERS * EXPERTS].view(LAYERS, EXPERTS), totals[LAYERS * EXPERTS:]
    trainer.train_step(0)
    strategy = core.sampler.strategy
    out = {"scores": strategy.ratios, "probabilities": strategy.probabilities().tolist(), "counts": counts,
           "ties": ties, "units": [u.name for u in core.units]}
    core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def routing(model_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("expert_routing"))
    return {engine: run_distributed(_routing_worker, 2, model_dir=model_dir, engine=engine, output_dir=root)[0]
            for engine in ("fsdp2", "zero3")}


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_routing_scores_experts_by_their_share_of_the_routed_tokens(routing, engine):
    """An expert's score is its share of its layer's routed tokens (over both ranks' first batches) times the
    expert count; each layer's rest scores 1; the probabilities mix the normalized scores with uniform_mix.

    The router chooses on its softmax probabilities, this test on the logits it returned: a token whose k-th and
    (k+1)-th logits nearly tie may land on another expert, moving one count while a layer's total (k per real
    token) stays. So an expert's count is within the layer's near-ties, and its score within EXPERTS x ties /
    total of the share counted here (plus the float64 division's rounding)."""
    obs = routing[engine]
    counts, ties = obs["counts"], obs["ties"]
    assert float(counts.sum()) > 0
    for unit, score in zip(obs["units"], obs["scores"]):
        if ".e" not in unit:
            assert score == 1.0, unit
            continue
        layer, expert = (int(x) for x in unit.split(".e"))
        total = float(counts[layer].sum())
        share = float(counts[layer, expert]) / total
        assert abs(score - share * EXPERTS) <= EXPERTS * float(ties[layer]) / total + 1e-12, unit
    total, n = sum(obs["scores"]), len(obs["scores"])
    expected = [0.9 * s / total + 0.1 / n for s in obs["scores"]]
    assert obs["probabilities"] == pytest.approx(expected, rel=1e-12)
    assert routing["fsdp2"]["scores"] == routing["zero3"]["scores"]
