"""Layer-sampling strategies and block units on 2 gloo ranks, on both engines: the ranks hold the same
statistics, a resume mid-interval (and mid-cycle) continues exactly as the uninterrupted run, and the
statistics the strategies draw on equal a plain one-process computation.

One spawn of two ranks runs every FSDP2 job in sequence, another the ZeRO-3 ones; the tests read what they left."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.importance import InputNorms, linear_modules, outlier_ratios
from lisa_dist.models import find_parts, sampling_units
from tests.helpers import (REDUCTION_ROUNDING, WholeShards, engine_weights, run_distributed, start_trainer,
                           tiny_config, tiny_start_weights)

STEPS, RESUME_AT = 5, 3  # interval 2: step 3 is mid-interval, and the resumed run switches once
# `weights` draws as `uniform` does, from fixed probabilities (tests/unit/test_sampler.py; the config-key
# test trains and resumes it): the jobs here are the strategies with statistics or an order of their own.
JOBS = {
    "outlier": {"strategy": "outlier", "outlier_threshold": 3.0},
    "cyclic": {"strategy": "cyclic", "interval": 1},  # 4 intervals a cycle: step 3 is mid-cycle
    # grad_norm over blocks, the finer units: layer units sum the same slots' gradients through a coarser map
    "block": {"strategy": "grad_norm", "unit": "block", "gamma": 3},
}
ENGINES = ("fsdp2", "zero3")


def _config(root: Path, name: str, engine: str, resume: str | None = None):
    out = root / engine / (f"{name}_resumed" if resume else name)
    return tiny_config(out, max_steps=STEPS, save_every=RESUME_AT, engine={"name": engine}, resume=resume,
                       lisa={"gamma": 2, "interval": 2, **JOBS[name]})


def _rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _job(root: Path, name: str, engine: str) -> dict:
    trainer = start_trainer(_config(root, name, engine))
    core, seen = trainer.core, {}
    run_step = core.step

    def step(i, micro_batches, *args, **kwargs):
        first = not seen
        if first:
            seen["batches"] = [{k: v.clone() for k, v in b.items()} for b in micro_batches]
        result = run_step(i, micro_batches, *args, **kwargs)
        if first:
            seen["after_first"] = core.sampler.strategy.state_dict()
        return result

    core.step = step
    trainer.fit()
    checkpoint = Path(trainer.output_dir) / "checkpoints" / f"step_{RESUME_AT}"
    resumed = start_trainer(_config(root, name, engine, resume=str(checkpoint)))
    resumed.fit()
    return {"weights": engine_weights(trainer), "resumed_weights": engine_weights(resumed),
            "rows": _rows(Path(trainer.output_dir)), "resumed_rows": _rows(Path(resumed.output_dir)),
            "state": core.sampler.strategy.state_dict(), "resumed_state": resumed.core.sampler.strategy.state_dict(),
            "first_batches": seen["batches"], "after_first": seen["after_first"],
            "slots": sorted(core.optimizer.slots), "final_units": [core.units[u].name for u in core.active_layers]}


# cyclic's order is the same integer arithmetic whatever the engine: FSDP2 only.
ENGINE_JOBS = {"fsdp2": list(JOBS), "zero3": ["outlier", "block"]}


def _jobs(rank: int, world_size: int, root: str, engine: str) -> dict:
    import os

    if engine == "zero3":
        os.environ["DS_ACCELERATOR"] = "cpu"
    return {name: _job(Path(root), name, engine) for name in ENGINE_JOBS[engine]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    return {engine: run_distributed(_jobs, root=str(root), engine=engine) for engine in ENGINES}


def _engine_jobs(*names: str) -> list[tuple[str, str]]:
    return [(engine, name) for engine in ENGINES for name in (names or JOBS) if name in ENGINE_JOBS[engine]]


def _train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("engine, name", _engine_jobs())
def test_resume_mid_interval_continues_exactly(runs, engine, name):
    """Weights, the units of each step after the resume, and the strategy's statistics: all bit for bit."""
    job = runs[engine][0][name]
    keys = ("active_layers", "active_blocks")
    uninterrupted = [{k: r.get(k) for k in keys} for r in _train_rows(job["rows"])[RESUME_AT:]]
    resumed = [{k: r.get(k) for k in keys} for r in _train_rows(job["resumed_rows"]) if r["step"] > RESUME_AT]
    assert resumed == uninterrupted and len(resumed) == STEPS - RESUME_AT
    assert job["resumed_state"] == job["state"]
    assert job["weights"].keys() == job["resumed_weights"].keys()
    for key, value in job["weights"].items():
        assert torch.equal(value, job["resumed_weights"][key]), key


@pytest.mark.parametrize("engine, name", _engine_jobs())
def test_ranks_hold_the_same_statistics(runs, engine, name):
    assert runs[engine][0][name]["state"] == runs[engine][1][name]["state"]
    assert runs[engine][0][name]["final_units"] == runs[engine][1][name]["final_units"]


def test_cyclic_trains_every_layer_once_per_cycle(runs):
    layers = [r["active_layers"] for r in _train_rows(runs["fsdp2"][0]["cyclic"]["rows"])]
    assert sorted(i for chosen in layers[:4] for i in chosen) == list(range(8))
    assert len(layers) == 5 and len(set(layers[4])) == 2


def _reference_model() -> transformers.PreTrainedModel:
    """The tiny model as saved: the weights every run starts from."""
    return transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)


def _reference_outlier_ratios(batches: list[dict], threshold: float) -> list[float]:
    model = _reference_model().eval()
    modules = [linear_modules(u.module) for u in sampling_units(find_parts(model), "layer")]
    norms = InputNorms([m for ms in modules for m in ms], torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run, so each micro-batch's activations are the same numbers
    with torch.no_grad(), norms.record():
        for batch in batches:
            norms.mask = batch.get("attention_mask")
            model(input_ids=batch["input_ids"], use_cache=False)
    torch.set_num_threads(threads)
    return outlier_ratios(modules, WholeShards(), norms, threshold, lambda t: t)


@pytest.mark.parametrize("engine", ENGINES)
def test_outlier_ratios_equal_one_process_on_the_first_batches(runs, engine):
    """Each rank's forward gives the reference's fp32 activations (same weights, shapes, threads); only
    float64 sums are taken in another order (relative error ~1e-15), so a weight's outlier test can flip
    only if its score is that close to the threshold: at most one weight per unit, 1 / its weights."""
    ranks = runs[engine]
    batches = [b for rank in ranks for b in rank["outlier"]["first_batches"]]
    reference = _reference_outlier_ratios(batches, JOBS["outlier"]["outlier_threshold"])
    ratios = ranks[0]["outlier"]["state"]["ratios"]
    unit_weights = 4 * 64 * 64 + 3 * 64 * 176  # q, k, v, o and gate, up, down of the tiny model
    assert len(ratios) == 8 and max(reference) > 0
    for ours, theirs in zip(ratios, reference):
        assert abs(ours - theirs) <= 1 / unit_weights


@pytest.mark.parametrize("engine, name", _engine_jobs("block"))
def test_grad_norm_estimates_equal_one_process_gradients(runs, engine, name):
    """After the first step, each trained unit's estimate is its gradient RMS over the global batch. The
    reference's gradient elements differ by at most REDUCTION_ROUNDING x the gradient norm (tests/helpers),
    so an RMS differs by at most that too (|RMS(a) - RMS(b)| <= max |a_i - b_i|)."""
    job = runs[engine][0][name]
    batches = [b for rank in runs[engine] for b in rank[name]["first_batches"]]
    model = _reference_model()
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        (loss / targets).backward()
    units = sampling_units(find_parts(model), JOBS[name].get("unit", "layer"))
    first = _train_rows(job["rows"])[0]
    grad_norm = first["grad_norm"]
    active = [u.name for u in units if (u.name in first.get("active_blocks", [])
                                        or ("active_blocks" not in first and int(u.name) in first["active_layers"]))]
    estimates = job["after_first"]["estimates"]
    assert sum(e is not None for e in estimates) == len(active) == JOBS[name].get("gamma", 2)
    for u, unit in enumerate(units):
        if unit.name not in active:
            assert estimates[u] is None
            continue
        grads = torch.cat([p.grad.reshape(-1) for p in unit.module.parameters()])
        rms = grads.pow(2).mean().sqrt().item()
        assert math.isclose(estimates[u], rms, rel_tol=0, abs_tol=REDUCTION_ROUNDING * grad_norm)


@pytest.mark.parametrize("engine", ENGINES)
def test_block_units_train_only_their_blocks(runs, engine):
    """A frozen block keeps its weights bit for bit though its layer's other block trains; optimizer state
    exists for the last interval's blocks, their layers' norms and the always-trained parts only."""
    job = runs[engine][0]["block"]
    start = tiny_start_weights()
    trained = {b for r in _train_rows(job["rows"]) for b in r["active_blocks"]}
    for name, value in job["weights"].items():
        if ".layers." not in name:
            continue
        layer, block = name.split(".layers.")[1].split(".")[:2]
        if block in ("self_attn", "mlp") and f"{layer}.{block}" not in trained:
            assert torch.equal(value, start[name]), name
    final = set(job["final_units"])
    for slot in job["slots"]:
        if ".layers." in slot:
            layer, block = slot.split(".layers.")[1].split(".")[:2]
            assert f"{layer}.{block}" in final or (block.endswith("norm") and
                                                    any(u.startswith(f"{layer}.") for u in final)), slot
    assert any(".self_attn." in s for s in job["slots"]) or any(".mlp." in s for s in job["slots"])
