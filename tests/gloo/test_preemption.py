"""Preemption on 2 gloo ranks, both engines: a signal of preempt.signals to one rank, at a step drawn at random
(seeded, printed), makes both ranks stop after the same step, save it and raise `Preempted` with
preempt.exit_code; resume=auto then ends with the uninterrupted run's final weights bit for bit (fp32 on CPU is
deterministic at a fixed world size) and metrics.jsonl holds every step once. A signal that arrives while a
checkpoint is written leaves that checkpoint whole and stops the run after the next step. The CLI under torchrun
and the SLURM script are tests/cli/test_preemption_cli.py."""

import os
import random
import signal
from pathlib import Path

import pytest

from lisa_dist import checkpoint as ckpt
from lisa_dist.config import load_config
from lisa_dist.errors import Preempted
from tests.helpers import COMMON, REPO, ZERO3, assert_same_final, metrics, run_distributed, start_trainer

os.environ.setdefault("DS_ACCELERATOR", "cpu")

MAX_STEPS = 6
# The step during which the signal arrives: drawn once per session, printed by the test that uses it.
SIGNAL_STEP = random.Random(int.from_bytes(os.urandom(4))).randint(1, MAX_STEPS - 1)
ENGINES = {"fsdp2": ["train.dtype=fp32"], "zero3": ZERO3}


def _config(out: Path, engine: str, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [*COMMON, *ENGINES[engine], f"max_steps={MAX_STEPS}",
                                                        "save_every=0", f"output_dir={out}", *extra])


def _signal_at(trainer, step: int, rank: int, signum: int, inside: str = "train_step") -> None:
    """Rank `rank` sends itself `signum` as trainer.`inside` (train_step or save) begins for `step` (1-based:
    the step it completes)."""
    original = getattr(trainer, inside)

    def wrapped(s: int, *args, **kwargs):
        done = s + 1 if inside == "train_step" else s
        if done == step and trainer.runtime.rank == rank:
            os.kill(os.getpid(), signum)
        return original(s, *args, **kwargs)

    setattr(trainer, inside, wrapped)


def _preempted(out: Path, engine: str, step: int, signum: int, inside: str, *extra: str) -> dict:
    trainer = start_trainer(_config(out, engine, *extra))
    _signal_at(trainer, step, rank=1, signum=signum, inside=inside)
    before = signal.getsignal(signum)
    try:
        trainer.fit()
    except Preempted as e:
        return {"exit_code": e.exit_code, "message": str(e), "handler_restored": signal.getsignal(signum) == before}
    return {"exit_code": None}


def _jobs(rank: int, world_size: int, root: str, step: int) -> dict:
    results = {}
    for engine, signum in (("fsdp2", signal.SIGUSR1), ("zero3", signal.SIGTERM)):
        base = Path(root) / engine
        start_trainer(_config(base / "straight", engine)).fit()
        results[engine] = _preempted(base / "preempted", engine, step, signum, "train_step", "preempt.exit_code=42")
        start_trainer(_config(base / "preempted", engine, "resume=auto")).fit()
    # a signal while step 3's periodic checkpoint is written
    out = Path(root) / "during_save"
    results["during_save"] = _preempted(out, "fsdp2", 3, signal.SIGTERM, "save", "save_every=3")
    results["during_save_checkpoints"] = [step for step, _ in ckpt.complete_checkpoints(out)]
    start_trainer(_config(out, "fsdp2", "save_every=3", "resume=auto")).fit()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("preempt")
    return root, run_distributed(_jobs, 2, root=str(root), step=SIGNAL_STEP)


@pytest.mark.parametrize("engine, signame", [("fsdp2", "SIGUSR1"), ("zero3", "SIGTERM")])
def test_a_signal_to_one_rank_stops_both_after_that_step_and_resume_ends_with_the_same_weights(runs, engine, signame):
    root, results = runs
    print(f"\nsignal during step {SIGNAL_STEP}")
    out = root / engine / "preempted"
    for rank, result in enumerate(results):
        assert result[engine]["exit_code"] == 42, (SIGNAL_STEP, rank, result[engine])
        assert f"{signame} received; every rank stopped after step {SIGNAL_STEP} of {MAX_STEPS}" in \
            result[engine]["message"], SIGNAL_STEP
        assert result[engine]["handler_restored"]
    # the run's only checkpoint is the preemption's (save_every=0)
    assert [step for step, _ in ckpt.complete_checkpoints(out)] == [SIGNAL_STEP], SIGNAL_STEP
    assert [r["step"] for r in metrics(out)] == list(range(1, MAX_STEPS + 1))
    straight = metrics(root / engine / "straight")
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in straight]
    assert_same_final(root / engine / "straight", out)


def test_a_signal_during_a_checkpoint_write_keeps_it_and_stops_after_the_next_step(runs):
    root, results = runs
    for result in results:
        assert result["during_save"]["exit_code"] == 75  # the default
        assert "stopped after step 4 of 6" in result["during_save"]["message"]
        assert result["during_save_checkpoints"] == [3, 4]
    assert [r["step"] for r in metrics(root / "during_save")] == list(range(1, MAX_STEPS + 1))
    assert_same_final(root / "fsdp2" / "straight", root / "during_save")
