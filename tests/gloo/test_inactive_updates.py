"""`lisa.inactive_update`: the decoder units LISA did not sample train inside backward by a state-free rule
(SGD, signSGD, AdaLomo), beside AdamW for the sampled ones. On 2 ranks, both engines, against one process:
every decoder weight moves, the sampled units' optimizer state is what plain LISA holds, signSGD moves each
element by whole steps of its rate, SGD and AdaLomo equal one process's weights within the reduction-order
bound, and a run resumed mid-interval continues bit for bit (bf16 with its stochastic rounding too)."""

import os
from pathlib import Path

import pytest
import torch

from lisa_dist.config import load_config
from tests.helpers import (COMMON, PARITY_ADALOMO_EPS1, PARITY_EPS, REPO, ZERO3, assert_same_final,
                           assert_weights_close, engine_weights, metrics, parity_atol, run_distributed, start_trainer,
                           tiny_config)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
STEPS, LR, INACTIVE_LR = 4, 1e-2, {"sgd": 0.5, "signsgd": 1e-3, "adalomo": 1e-2}
ADAMW = {"name": "adamw", "lr": LR, "max_grad_norm": 1.0, "eps": PARITY_EPS,
         "adalomo_eps": [PARITY_ADALOMO_EPS1, 1e-3]}
# gamma 1 of the tiny model's 8 layers for one interval longer than the run: 7 layers train by the inactive rule only.
LISA = {"gamma": 1, "interval": STEPS + 1}


def _worker(rank: int, world_size: int, output_dir: str, engine: str, rule: str) -> dict:
    config = tiny_config(f"{output_dir}/{engine}{world_size}{rule}", engine={"name": engine}, optim=ADAMW,
                         lisa={**LISA, "inactive_update": rule,
                               **({"inactive_lr": INACTIVE_LR[rule]} if rule != "none" else {})},
                         train={"micro_batch_size": 8 // world_size})
    trainer = start_trainer(config)
    start = engine_weights(trainer)
    records = [trainer.train_step(step) for step in range(STEPS)]
    core = trainer.core
    out = {"start": start, "end": engine_weights(trainer), "records": records,
           "state": core.optimizer.state_bytes(), "slots": sorted(core.optimizer.slots),
           "inactive_state": core.inactive.state_bytes() if core.inactive else None}
    core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inactive"))
    out = {}
    for rule in ("none", "signsgd", "sgd", "adalomo"):
        for engine in ("fsdp2", "zero3"):
            out[engine, rule] = run_distributed(_worker, 2, output_dir=root, engine=engine, rule=rule)
    for rule in ("sgd", "adalomo"):
        out["one", rule] = run_distributed(_worker, 1, output_dir=root, engine="fsdp2", rule=rule)
    return out


def _layer(name: str) -> int | None:
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
@pytest.mark.parametrize("rule", ["signsgd", "sgd", "adalomo"])
def test_every_decoder_weight_trains_and_state_stays_the_sampled_units(runs, engine, rule):
    plain, obs = runs[engine, "none"][0], runs[engine, rule][0]
    active = {layer for r in obs["records"] for layer in r["active_layers"]}
    assert len(active) == 1 and [r["active_layers"] for r in obs["records"]] == \
        [r["active_layers"] for r in plain["records"]]
    for name, start in obs["start"].items():
        assert not torch.equal(start, obs["end"][name]), name
        if _layer(name) is not None and _layer(name) not in active:
            assert torch.equal(start, plain["end"][name]), name  # plain LISA leaves it frozen
    # AdamW state and masters for the sampled layer and the always-trained parts only, as plain LISA
    assert obs["slots"] == plain["slots"] and obs["state"] == plain["state"]
    assert obs["inactive_state"] == (0 if rule != "adalomo" else obs["inactive_state"])


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_signsgd_moves_each_unsampled_element_by_whole_steps_of_its_rate(runs, engine):
    """Each step moves an element by exactly inactive_lr against its gradient's sign (0 for a zero gradient):
    after 4 steps a never-sampled element has moved by k x inactive_lr, k an integer in [-4, 4]; fp32 rounding of
    weights below 1 is under 1e-7, far inside the 1e-3 of a step allowed."""
    obs = runs[engine, "signsgd"][0]
    active = {layer for r in obs["records"] for layer in r["active_layers"]}
    for name, start in obs["start"].items():
        if _layer(name) is None or _layer(name) in active:
            continue
        steps = (start - obs["end"][name]).double() / INACTIVE_LR["signsgd"]
        assert (steps - steps.round()).abs().max() < 1e-3, name
        assert 1 - 1e-3 <= steps.abs().max() <= STEPS + 1e-3, name


@pytest.mark.parametrize("rule", ["sgd", "adalomo"])
def test_two_ranks_on_either_engine_equal_one_process(runs, rule):
    """The bound is AdamW's for the sampled layer plus the inactive rule's for the others (`parity_atol`; the
    inactive rule clips by the previous step's norm, itself a reduced sum, as `max_grad_norm` accounts for)."""
    one = runs["one", rule][0]
    for engine in ("fsdp2", "zero3"):
        two = runs[engine, rule][0]
        norms = [r["grad_norm"] for run in (one, two) for r in run["records"]]
        inactive = {"name": "lomo" if rule == "sgd" else rule, "lr": INACTIVE_LR[rule], "max_grad_norm": 1.0,
                    "adalomo_eps": ADAMW["adalomo_eps"]}
        atol = parity_atol(ADAMW, STEPS, max(norms)) + parity_atol(inactive, STEPS, max(norms))
        assert_weights_close(two["end"], one["end"], atol)


def _resume_jobs(rank: int, world_size: int, root: str) -> None:
    for name, extra in (("fsdp2_adalomo", ["lisa.inactive_update=adalomo", "train.dtype=fp32"]),
                        ("fsdp2_signsgd_bf16", ["lisa.inactive_update=signsgd", "train.dtype=bf16"]),
                        ("zero3_adalomo", ["lisa.inactive_update=adalomo", *ZERO3])):
        args = [*COMMON, "train.micro_batch_size=4", "optim.lr=0.01", "max_steps=6", "save_every=3", *extra]
        straight = Path(root) / name / "straight"
        for out, more in ((straight, []), (Path(root) / name / "resumed", [f"resume={straight}/checkpoints/step_3"])):
            config = load_config(REPO / "configs" / "tiny.yaml", [*args, *more, f"output_dir={out}"])
            start_trainer(config).fit()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inactive_resume")
    run_distributed(_resume_jobs, 2, root=str(root))
    return root


@pytest.mark.parametrize("name", ["fsdp2_adalomo", "fsdp2_signsgd_bf16", "zero3_adalomo"])
def test_a_run_resumed_mid_interval_continues_bit_for_bit(resumed, name):
    """Step 3's checkpoint falls inside an interval of 2: AdaLomo's statistics of the units not sampled, and the
    stochastic rounding of bf16 updates (drawn per step), continue as in the straight run."""
    a, b = metrics(resumed / name / "straight"), metrics(resumed / name / "resumed")
    assert [r["step"] for r in b] == [4, 5, 6]
    assert [(r["loss"], r["grad_norm"], r["active_layers"]) for r in a[3:]] == \
        [(r["loss"], r["grad_norm"], r["active_layers"]) for r in b]
    assert_same_final(resumed / name / "straight", resumed / name / "resumed")
