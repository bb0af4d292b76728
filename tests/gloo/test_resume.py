"""Exact resume of the training state a checkpoint carries besides the weights, on 2 gloo ranks: the warmup
and cosine schedule with the fp16 loss scale, and AdaLomo with lagged clipping resumed mid-interval. Each
job trains 6 steps straight, and again from the straight run's step-3 checkpoint in a directory of its own,
as `lisa-dist train configs/tiny.yaml ... resume=DIR` builds it (the CLI's own resume paths are
tests/cli/test_train_cli.py and test_reliability_cli.py). fp32 and fp16 on CPU are deterministic for the
same world size: everything is compared bit for bit."""

from pathlib import Path

import pytest

from lisa_dist.config import load_config
from tests.helpers import COMMON, REPO, assert_same_final, metrics, run_distributed, start_trainer

JOBS = {
    "fp16_cosine": ["train.dtype=fp16", "optim.schedule=cosine", "optim.warmup_steps=2", "train.loss_scale=1024",
                    "train.loss_scale_window=2"],
    "adalomo_lagged_clip": ["train.dtype=fp32", "optim.name=adalomo", "optim.lr=0.01", "optim.max_grad_norm=0.5",
                            "method=lisa", "train.micro_batch_size=1"],
}


def _train(out: Path, args: list[str]) -> None:
    config = load_config(REPO / "configs" / "tiny.yaml", [*COMMON, *args, "max_steps=6", "save_every=3",
                                                          f"output_dir={out}"])
    start_trainer(config).fit()


def _jobs(rank: int, world_size: int, root: str) -> None:
    for name, args in JOBS.items():
        straight = Path(root) / name / "straight"
        _train(straight, args)
        _train(Path(root) / name / "resumed", [*args, f"resume={straight / 'checkpoints' / 'step_3'}"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    run_distributed(_jobs, 2, root=str(root))
    return root


def test_resume_continues_the_warmup_cosine_schedule_and_the_fp16_loss_scale_exactly(runs):
    a, b = metrics(runs / "fp16_cosine" / "straight"), metrics(runs / "fp16_cosine" / "resumed")
    assert [r["step"] for r in b] == [4, 5, 6]
    assert len({r["lr"] for r in a}) >= 4 and len({r["loss_scale"] for r in a[:4]}) > 1  # both states move
    assert [(r["loss"], r["lr"], r["loss_scale"], r["grad_norm"]) for r in a[3:]] == \
        [(r["loss"], r["lr"], r["loss_scale"], r["grad_norm"]) for r in b]
    assert_same_final(runs / "fp16_cosine" / "straight", runs / "fp16_cosine" / "resumed")


def test_adalomo_resume_with_lagged_clipping_continues_exactly(runs):
    a, b = metrics(runs / "adalomo_lagged_clip" / "straight"), metrics(runs / "adalomo_lagged_clip" / "resumed")
    assert [r["step"] for r in b] == [4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in a[3:]] == [(r["loss"], r["grad_norm"]) for r in b]
    assert_same_final(runs / "adalomo_lagged_clip" / "straight", runs / "adalomo_lagged_clip" / "resumed")
