"""A model that draws random numbers in training (GPT-2's dropout, 0.1 on embeddings, attention and residuals),
on 2 gloo ranks: its draws follow the seed, the step and the rank, so a second run in the same process repeats
the first bit for bit and a run resumed from a checkpoint ends with the uninterrupted run's weights, on both
engines; and AdaLomo's two passes (a measuring one, then the one that updates) draw the same masks. Without
the seeding the second run and the resumed one would draw from where the first left torch's global generator."""

import os
from pathlib import Path

import pytest
import transformers

from tests.helpers import assert_same_final, metrics, run_distributed, start_trainer, tiny_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
GPT2 = dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=512)


def _train(out: Path, model_dir: str, engine: str, **sections) -> None:
    sections = {"lisa": {"gamma": 2, "interval": 2}, "optim": {"lr": 1e-2}, **sections}
    config = tiny_config(out, max_steps=4, save_every=2, model={"path": None, "config": model_dir},
                         engine={"name": engine}, **sections)
    start_trainer(config).fit()


def _jobs(rank: int, world_size: int, root: str) -> None:
    for engine in ("fsdp2", "zero3"):
        straight = Path(root) / engine / "straight"
        _train(straight, f"{root}/dropout", engine)
        _train(Path(root) / engine / "again", f"{root}/dropout", engine)
        _train(Path(root) / engine / "resumed", f"{root}/dropout", engine,
               resume=str(straight / "checkpoints" / "step_2"))
    _train(Path(root) / "fsdp2" / "no_dropout", f"{root}/no_dropout", "fsdp2")
    for precheck in (False, True):
        _train(Path(root) / "fsdp2" / f"adalomo_precheck_{precheck}", f"{root}/dropout", "fsdp2",
               optim={"name": "adalomo", "lr": 1e-2, "max_grad_norm": 0.0, "fused_precheck": precheck})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("randomness")
    transformers.GPT2Config(**GPT2).save_pretrained(root / "dropout")
    transformers.GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(
        root / "no_dropout")
    run_distributed(_jobs, 2, root=str(root))
    return root


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out)]


def test_dropout_is_drawn_in_these_runs(runs):
    assert _losses(runs / "fsdp2" / "straight") != _losses(runs / "fsdp2" / "no_dropout")


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_a_second_run_with_dropout_repeats_the_first_bit_for_bit(runs, engine):
    assert _losses(runs / engine / "again") == _losses(runs / engine / "straight")
    assert_same_final(runs / engine / "straight", runs / engine / "again")


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_a_resumed_run_with_dropout_ends_with_the_uninterrupted_weights(runs, engine):
    straight, resumed = metrics(runs / engine / "straight"), metrics(runs / engine / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in straight[2:]] == [(r["loss"], r["grad_norm"]) for r in resumed]
    assert_same_final(runs / engine / "straight", runs / engine / "resumed")


def test_adalomos_measuring_pass_draws_what_its_updating_pass_draws(runs):
    # Unclipped, a step with the precheck measures the norm in its first pass and updates in its second; one
    # without it updates in its one pass and measures the norm there. Equal norms and weights: the same masks.
    one, two = runs / "fsdp2" / "adalomo_precheck_False", runs / "fsdp2" / "adalomo_precheck_True"
    assert [(r["loss"], r["grad_norm"]) for r in metrics(one)] == [(r["loss"], r["grad_norm"]) for r in metrics(two)]
    assert_same_final(one, two)
