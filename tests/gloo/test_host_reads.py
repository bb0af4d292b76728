"""Host reads and collectives per optimizer step, on 2 gloo ranks and both engines: what lisa_dist itself reads
back from the device and reduces in a step that switches no layer and writes no log line, evaluation or
checkpoint (a GPU waits for its stream at every read). Counted by `benchmarks/host_reads.py`: a dispatch mode
(`.item()` and the like, and c10d collectives) and `lisa_dist.values.Values`' vector reads, each attributed to the
innermost of lisa_dist, transformers and the engines on the stack; the engines' all-gathers and reduce-scatters
and transformers' own reads are not lisa_dist's."""

import os

import pytest

from tests.helpers import run_distributed, start_trainer, tiny_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
RUNS = {"lisa_adamw": dict(lisa={"gamma": 2, "interval": 100}, optim={"name": "adamw", "lr": 1e-3,
                                                                        "max_grad_norm": 1.0}),
        "lisa_lomo": dict(lisa={"gamma": 2, "interval": 100}, optim={"name": "lomo", "lr": 1e-3}),
        "lisa_lomo_precheck": dict(lisa={"gamma": 2, "interval": 100},
                                   optim={"name": "lomo", "lr": 1e-3, "max_grad_norm": 1.0, "fused_precheck": True})}
COLLECTIVES = {"lisa_adamw": 3, "lisa_lomo": 3, "lisa_lomo_precheck": 5}
"""The global token counts (before backward) and the step's figures (after it), and: AdamW, the gradient norm
before its update (clipping and skipping decide by it); LOMO, whether every rank's losses were finite, before the
last micro-batch's backward (its updates stand only then); LOMO with precheck, that for each of its two
passes, and the checking pass's norm and non-finite count, before the applying pass."""


def _worker(rank: int, world_size: int, output_dir: str, engine: str) -> dict:
    from benchmarks.host_reads import count_steps, count_vector_reads

    count_vector_reads()
    out = {}
    for name, run in RUNS.items():
        trainer = start_trainer(tiny_config(f"{output_dir}/{engine}/{name}", engine={"name": engine}, **run))
        out[name] = count_steps(trainer, 4)[2:]  # the first steps switch layers and warm up DeepSpeed's trace
        trainer.core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("host_reads"))
    return {engine: run_distributed(_worker, 2, output_dir=out, engine=engine)[0] for engine in ("fsdp2", "zero3")}


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
@pytest.mark.parametrize("run", list(RUNS))
def test_lisa_dist_reads_the_device_once_and_reduces_a_fixed_few_times_per_step(counts, engine, run):
    """Per step (two micro-batches per rank in each run): one read, of the step's figures after backward; every
    decision before it (clip, skip, hold back an update) is taken on the device from sums reduced there."""
    for step in counts[engine][run]:
        assert step.get("lisa_dist vector read", 0) == 1, step
        assert step.get("lisa_dist scalar read", 0) == 0, step
        assert step.get("lisa_dist collective", 0) == COLLECTIVES[run], step
