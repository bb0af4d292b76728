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
MICRO_BATCHES = {"lisa_adamw": 2, "full_lomo": 1}
RUNS = {"lisa_adamw": dict(lisa={"gamma": 2, "interval": 100}, optim={"name": "adamw", "lr": 1e-3,
                                                                        "max_grad_norm": 1.0}),
        "full_lomo": dict(method="full", optim={"name": "lomo", "lr": 1e-3}, train={"micro_batch_size": 4})}


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
def test_lisa_dist_reads_the_device_and_reduces_a_fixed_few_times_per_step(counts, engine, run):
    """Per step: the global token counts, summed on the device before backward (a collective, no read), and
    the step's figures after it (one reduction, one read). AdamW reads the gradient norm before its update
    (clipping and skipping decide by it: one reduction, one read); LOMO, which clips by the previous step's
    norm, reads it with the figures, but checks each micro-batch's loss finite on every rank before its
    backward (one reduction, one read each). Besides, two scalars per micro-batch from the host-side batch (its
    labelled and real tokens), which wait for no device."""
    micro = MICRO_BATCHES[run]
    fused = run == "full_lomo"
    for step in counts[engine][run]:
        assert step.get("lisa_dist vector read", 0) == (1 + micro if fused else 2), step
        assert step.get("lisa_dist collective", 0) == (2 + micro if fused else 3), step
        assert step.get("lisa_dist scalar read", 0) == 2 * micro, step
