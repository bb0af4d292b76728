"""Non-finite steps, checkpoint retention and rank disagreement at resume, with 2 gloo ranks running
`Trainer.fit` as `lisa-dist train` does."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lisa_dist import checkpoint as ckpt
from lisa_dist.assets import TINY_ALPACA
from lisa_dist.errors import NonFiniteStepsError, RankDisagreementError
from tests.helpers import full_weights, run_distributed, start_trainer, tiny_config

POISON_FROM = 3  # step index: steps 4, 5, 6 (1-based) meet non-finite values
os.environ.setdefault("DS_ACCELERATOR", "cpu")
NONFINITE = {  # (optimizer, where the non-finite values appear, engine)
    "adamw_nan_loss": ({"name": "adamw", "lr": 1e-3}, "loss", "fsdp2"),
    "adamw_inf_grad": ({"name": "adamw", "lr": 1e-3}, "grad", "fsdp2"),
    "lomo_nan_loss": ({"name": "lomo", "lr": 0.05}, "loss", "fsdp2"),
    "lomo_inf_grad": ({"name": "lomo", "lr": 0.05}, "grad", "fsdp2"),
    "lomo_precheck_inf_grad": ({"name": "lomo", "lr": 0.05, "fused_precheck": True}, "grad", "fsdp2"),
    "zero3_adamw_inf_grad": ({"name": "adamw", "lr": 1e-3}, "grad", "zero3"),
    "zero3_adalomo_nan_loss": ({"name": "adalomo", "lr": 0.01}, "loss", "zero3"),
}


def _weights(trainer) -> dict[str, torch.Tensor] | None:
    """Whole weights: on every rank for FSDP2, on rank 0 (None elsewhere) for ZeRO-3."""
    if trainer.core.engine.name == "fsdp2":
        return full_weights(trainer)
    state = trainer.core.engine.full_state_dict()
    return None if state is None else {k: v.float() for k, v in state.items()}


def _poison(trainer, where: str) -> dict:
    """From step POISON_FROM on, the logits turn NaN (a NaN loss) or their gradient turns inf (finite loss,
    every gradient non-finite). Returns what the run looked like before the first poisoned step."""
    seen: dict = {}
    poisoned = {"on": False}

    def logits_hook(module, inputs, output):
        if not poisoned["on"]:
            return output
        if where == "loss":
            return output * math.nan
        output.register_hook(lambda g: g * math.inf)
        return output

    trainer.core.parts.head.register_forward_hook(logits_hook)
    train_step = trainer.train_step

    def step(s: int) -> dict:
        poisoned["on"] = s >= POISON_FROM
        if s == POISON_FROM:
            seen["weights"] = _weights(trainer)
        return train_step(s)

    trainer.train_step = step
    return seen


def _nonfinite(output_dir: Path, optim: dict, where: str, engine: str) -> dict:
    config = tiny_config(output_dir, max_steps=8, save_every=2, method="full",
                         train={"max_consecutive_skips": 3, "micro_batch_size": 4},
                         optim=optim, engine={"name": engine})
    trainer = start_trainer(config)
    seen = _poison(trainer, where)
    try:
        trainer.fit()
        error = None
    except NonFiniteStepsError as e:
        error = str(e)
    trainer.core.stepper.hooks.remove()
    after, before = _weights(trainer), seen["weights"]
    changed = [] if after is None else [n for n in after if not torch.equal(after[n], before[n])]
    return {"error": error, "changed": changed, "weights": before}


def _retention(output_dir: Path) -> dict[str, list[str]]:
    """Keep 2 of 5 checkpoints; then branch from step_4 with a limit of 1: the old step_5 is set aside, not
    kept as 'newest' while the branch's own checkpoint is pruned."""
    out = {}
    for key, sections in (("kept", {}), ("branched", {"resume": str(output_dir / "checkpoints" / "step_4"),
                                                       "save_total_limit": 1})):
        trainer = start_trainer(tiny_config(output_dir, **{"max_steps": 5, "save_every": 1, "save_total_limit": 2,
                                                           **sections}))
        if key == "branched":
            old_step_5 = ckpt.step_dir(output_dir, 5).stat().st_ino
        trainer.fit()
        trainer.core.stepper.hooks.remove()
        out[key] = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    out["abandoned"] = [p.stat().st_ino == old_step_5 for p in (output_dir / "checkpoints" / "abandoned").iterdir()]
    out["latest"] = ckpt.latest_checkpoint(output_dir).stat().st_ino != old_step_5
    return out


def _disagreement(output_dir: Path, rank: int, what: str) -> str:
    """Rank 1 misses the newest checkpoint (a node-local disk that missed the last save), or has a copy
    of the data that differs from rank 0's."""
    data = TINY_ALPACA
    if what == "checkpoint" and rank == 1:
        listed = ckpt.complete_checkpoints
        ckpt.complete_checkpoints = lambda out: listed(out)[:-1]  # it missed the newest
    if what == "data" and rank == 1:
        data = output_dir.parent / "other_data.jsonl"
        lines = Path(TINY_ALPACA).read_text().splitlines()
        data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same examples, another order
    trainer = start_trainer(tiny_config(output_dir, max_steps=5, save_every=1, save_total_limit=2, resume="auto",
                                        data={"path": str(data)}))
    try:
        trainer.fit()
    except RankDisagreementError as e:
        return str(e)
    finally:
        trainer.core.stepper.hooks.remove()
    return "no error"


def _config_disagreement(output_dir: Path, rank: int) -> str:
    """Rank 1 launched with another learning rate (a node with an edited copy of the YAML)."""
    from lisa_dist.train import run_training

    try:
        run_training(tiny_config(output_dir, optim={"name": "adamw", "lr": 1e-3 * (1 + rank)}))
    except RankDisagreementError as e:
        return str(e)
    return "no error"


def _worker(rank: int, world_size: int, output_dir: str) -> dict:
    root = Path(output_dir)
    out = {key: _nonfinite(root / key, *case) for key, case in NONFINITE.items()}
    out["retention"] = _retention(root / "retention")
    latest = ckpt.latest_checkpoint
    for what in ("checkpoint", "data"):
        out[f"disagree_{what}"] = _disagreement(root / "retention", rank, what)
        ckpt.latest_checkpoint = latest
    out["disagree_config"] = _config_disagreement(root / "config", rank)  # last: it ends the process group
    return out


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return root, run_distributed(_worker, 2, output_dir=str(root))


@pytest.mark.parametrize("key", NONFINITE)
def test_nonfinite_steps_change_no_weight_are_counted_and_stop_the_run(observed, key):
    root, ranks = observed
    out = root / key
    for rank in ranks:
        obs = rank[key]
        assert obs["changed"] == []
        assert "steps 4 to 6: 3 steps in a row met a non-finite loss or gradient" in obs["error"]
        assert "train.max_consecutive_skips=3" in obs["error"]
        assert f"the last checkpoint, {out / 'checkpoints' / 'step_4'}, is intact" in obs["error"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    bad = records[POISON_FROM:]
    optim, where, _ = NONFINITE[key]
    if where == "grad" and optim["name"] == "lomo" and not optim.get("fused_precheck"):
        # one fused pass: each shard's update is refused as its non-finite gradient arrives
        assert all(r["nonfinite_grad_shards"] > 0 and not r["skipped"] for r in bad)
    else:
        assert [r["skipped"] for r in records] == [False] * POISON_FROM + [True] * 3
        assert [r["skipped_steps"] for r in bad] == [1, 2, 3]
    assert not (out / "final").exists()
    exported = root / f"{key}_exported"
    ckpt.export_checkpoint(out / "checkpoints" / "step_4", exported)
    from safetensors.torch import load_file

    saved = load_file(exported / "model.safetensors")
    for name, weight in ranks[0][key]["weights"].items():
        assert torch.equal(saved[name].float(), weight), name


def test_save_total_limit_keeps_the_newest_checkpoints_and_a_branch_sets_later_ones_aside(observed):
    _, ranks = observed
    retention = ranks[0]["retention"]
    assert retention["kept"] == ["step_4", "step_5"]
    assert retention["branched"] == ["abandoned", "step_5"]
    assert retention["abandoned"] == [True] and retention["latest"]


@pytest.mark.parametrize("what, details", [
    ("checkpoint", ["ranks disagree on the complete checkpoints in output_dir: rank 1: [] where rank 0 has ['",
                    "step_5']"]),
    ("data", ["ranks disagree on the training data", "rank 1: fingerprint '"]),
    ("config", ["ranks disagree on the run configuration", "rank 1: optim.lr 0.002 where rank 0 has 0.001 (ranks [1]"]),
])
def test_ranks_that_disagree_stop_naming_them_and_the_difference(observed, what, details):
    """Rank 1 resumes from another checkpoint, reads another copy of the data, or runs another configuration."""
    _, ranks = observed
    for rank in ranks:
        message = rank[f"disagree_{what}"]
        for detail in [*details, "ranks [1] differ from rank 0"]:
            assert detail in message, message
