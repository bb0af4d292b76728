"""Whole CLI runs: torchrun with 2 ranks, outputs, export, resume, user errors."""

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from tests.helpers import REPO, COMMON, assert_same_final, lisa_dist, metrics, torchrun


def test_metrics_have_one_record_per_step_with_the_contract_fields(run):
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "loss", "lr", "active_layers", "tokens_per_s", "peak_mem_gib", "optim_state_gib"} <= r.keys()
        assert len(r["active_layers"]) == 2 and r["active_layers"] == sorted(r["active_layers"])
        assert 0 < r["optim_state_gib"] < r["peak_mem_gib"]
        assert len(r["peak_mem_gib_per_rank"]) == 2 and max(r["peak_mem_gib_per_rank"]) == r["peak_mem_gib"]
        assert min(r["peak_mem_gib_per_rank"]) > 0
    assert records[0]["active_layers"] == records[1]["active_layers"]


def test_without_a_terminal_rank_0_prints_progress_lines(run):
    lines = [line for line in (run.parent / "stderr.txt").read_text().splitlines()
             if line.startswith("lisa-dist: step ")]
    # logging.log_every=10 by default: of 6 steps, only the last one is printed.
    assert len(lines) == 1 and lines[0].startswith("lisa-dist: step 6/6 loss ")
    for part in (" lr ", " tokens/s ", " peak ", " layers [", " elapsed ", " remaining 0:00:00"):
        assert part in lines[0]


def test_report_plots_the_run(run, tmp_path):
    result = lisa_dist("report", str(run), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    names = {"loss.png", "throughput.png", "memory.png", "layers.png", "layer_updates.png"}
    assert {Path(line).name for line in result.stdout.split()} == names
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_checkpoints_are_complete_and_final_loads_in_transformers(run):
    for step in (3, 6):
        directory = run / "checkpoints" / f"step_{step}"
        assert (directory / "COMPLETE").is_file() and (directory / "trainer_state.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 8
    transformers.AutoTokenizer.from_pretrained(run / "final")


def test_export_of_the_last_checkpoint_equals_final(run, tmp_path):
    result = lisa_dist("export", str(run / "checkpoints" / "step_6"), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    for name in final:
        assert torch.equal(exported[name], final[name]), name


def test_resume_at_the_end_of_an_interval_continues_exactly(run, tmp_path):
    """Stopped after step 4, the last of an interval (lisa.interval=2): the checkpoint's optimizer state is
    for the layers of steps 3-4, and the resumed run switches at step 5 as the uninterrupted one did.
    (tests/gloo/test_resume.py resumes AdaLomo in the middle of one.)"""
    out = tmp_path / "resumed"
    first = torchrun(f"output_dir={out}", "max_steps=4", "save_every=4", "train.dtype=fp32")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(f"output_dir={out}", "max_steps=6", "save_every=3", "train.dtype=fp32", "resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, straight = metrics(out), metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["active_layers"] for r in resumed] == [r["active_layers"] for r in straight]
    # fp32 on CPU is deterministic: the resumed run is the uninterrupted one, bit for bit
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in straight]
    assert_same_final(out, run)


def test_chat_data_packed_trains_in_one_process(tmp_path):
    from lisa_dist.assets import TINY_CHAT

    result = lisa_dist("train", str(REPO / "configs" / "tiny.yaml"), *COMMON, f"output_dir={tmp_path}",
                       f"data.path={TINY_CHAT}", "data.pack=true", "max_steps=4", "optim.lr=3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_resume_with_a_changed_config_is_refused(run):
    result = torchrun(f"output_dir={run}", "max_steps=6", "save_every=3", "train.dtype=fp32", "resume=auto",
                      "optim.lr=0.5")
    assert result.returncode != 0
    assert "different configuration (optim.lr: 0.003 -> 0.5)" in result.stderr
