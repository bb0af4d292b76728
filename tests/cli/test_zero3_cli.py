"""Whole ZeRO-3 runs: the deepspeed launcher, torchrun, checkpoints, resume and export."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import COMMON, DS_ENV, REPO, ZERO3, assert_same_final, lisa_dist, metrics, torchrun


@pytest.fixture
def straight(zero3_run):
    return zero3_run


def test_deepspeed_launcher_runs_zero3_end_to_end(straight):
    records = metrics(straight)
    assert [r["step"] for r in records] == list(range(1, 7)) and records[-1]["loss"] < records[0]["loss"]
    state = json.loads((straight / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["engine"] == "zero3" and state["world_size"] == 2


def test_zero3_resume_under_torchrun_continues_exactly(straight, tmp_path):
    out = tmp_path / "resumed"
    for steps, extra in ((3, []), (6, ["resume=auto"])):
        result = torchrun(f"output_dir={out}", f"max_steps={steps}", *ZERO3, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = metrics(straight), metrics(out)
    assert [(r["loss"], r["active_layers"]) for r in a] == [(r["loss"], r["active_layers"]) for r in b]
    assert_same_final(straight, out)


def test_zero3_export_equals_final(straight, tmp_path):
    result = lisa_dist("export", str(straight / "checkpoints" / "step_6"), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    final = load_file(straight / "final" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_contradicting_deepspeed_config_is_refused_before_start(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    result = lisa_dist("train", str(REPO / "configs" / "tiny.yaml"), *COMMON, f"output_dir={tmp_path / 'o'}",
                       "engine.name=zero3", f"engine.deepspeed_config={bad}")
    assert result.returncode == 2
    assert "remove the 'optimizer' block: lisa_dist owns the optimizer" in result.stderr


def test_a_zero3_checkpoint_resumes_on_fsdp2(straight, tmp_path):
    """Both engines on 2 ranks: ZeRO-3's flat partitions become FSDP2's row shards (rank 1 starts mid-tensor)."""
    from tests.helpers import assert_same_training

    out = tmp_path / "fsdp2"
    result = torchrun(f"output_dir={out}", "max_steps=6", "train.dtype=fp32",
                      f"resume={straight / 'checkpoints' / 'step_3'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(straight, out, 3)


def test_zero3_runs_as_one_plain_process_from_a_preset(tmp_path):
    """`python -m lisa_dist train ... engine.name=zero3` without a launcher: a world of one, as for FSDP2
    (DeepSpeed's zero.Init reads LOCAL_RANK, which no launcher set)."""
    out = tmp_path / "plain"
    result = subprocess.run([sys.executable, "-m", "lisa_dist", "train", str(REPO / "configs" / "tiny.yaml"), *COMMON,
                             "model.path=null", "model.preset=tiny", "engine.name=zero3", "max_steps=2",
                             f"output_dir={out}"], cwd=REPO, env=DS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()
