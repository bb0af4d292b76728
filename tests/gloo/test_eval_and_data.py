"""Evaluation, trackers and the data formats users bring, on 2 gloo ranks.

One spawn of two ranks runs the FSDP2 jobs in sequence (each a short `Trainer.fit`), another the ZeRO-3
ones; the tests read what they left."""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers

from lisa_dist.assets import TINY_ALPACA, TINY_CHAT, TINY_MODEL_DIR
from lisa_dist.sizing.memory import StorageTracker
from tests.helpers import CHATML, engine_weights, run_distributed, start_trainer, tiny_config

EVAL_ROWS = 10
# Evaluation every 2 steps with trackers on; the same run without any evaluation must end identically.
WITH_EVAL = {"max_steps": 4, "eval_every": 2, "logging": {"report_to": ["tensorboard", "wandb"], "log_every": 1}}


def _write_inputs(root: Path) -> dict[str, dict]:
    """The data of every format, and each job's data section."""
    rows = [json.loads(line) for line in TINY_ALPACA.read_text().splitlines()]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-EVAL_ROWS:]))
    chats = [json.loads(line) for line in TINY_CHAT.read_text().splitlines()][:64]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c["messages"]]}
                for c in chats]
    (root / "sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": r["output"] + " " + r["instruction"]}) + "\n"
                                             for r in rows[:64]))
    renamed = [{"question": r["instruction"], "answer": r["output"]} for r in rows[:64]]
    (root / "renamed.json").write_text(json.dumps(renamed))
    table = datasets.Dataset.from_list(rows[:64])
    table.to_parquet(str(root / "alpaca.parquet"))
    table.save_to_disk(str(root / "saved"))
    chatml_dir = root / "chatml_tokenizer"
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(chatml_dir)
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return {
        "sharegpt": {"data": {"path": str(root / "sharegpt.jsonl")}},
        "text": {"data": {"path": str(root / "text.jsonl"), "pack": True}},
        "json_fields": {"data": {"path": str(root / "renamed.json"),
                                 "fields": {"instruction": "question", "output": "answer"}}},
        "parquet": {"data": {"path": str(root / "alpaca.parquet")}},
        "saved": {"data": {"path": str(root / "saved")}},
        "chat_template": {"data": {"path": str(root / "chat.jsonl"), "seq_len": 160},
                          "model": {"tokenizer": str(chatml_dir)}},
    }


def _fit(config):
    trainer = start_trainer(config)
    trainer.fit()
    return trainer


def _eval_peak(trainer) -> int:
    """The storage peak of one more evaluation, counted like a step's."""
    tracker = StorageTracker()
    tracker.track(trainer.core.memory_tensors())
    tracker.reset_peak()
    with tracker:
        trainer.evaluate(trainer.config.max_steps)
    return tracker.peak


def _fsdp2_jobs(rank: int, world_size: int, root: str, formats: dict[str, dict]) -> dict:
    import os

    os.environ["WANDB_MODE"] = "offline"
    root = Path(root)
    eval_path = str(root / "eval.jsonl")
    out = {}
    with_eval = _fit(tiny_config(root / "with_eval", data={"eval_path": eval_path}, **WITH_EVAL))
    out["with_eval"] = engine_weights(with_eval)
    out["eval_batches"] = with_eval.evaluator.micro_batches
    out["eval_peak"] = _eval_peak(with_eval)
    out["without_eval"] = engine_weights(_fit(tiny_config(root / "without_eval", max_steps=4)))
    for name, sections in formats.items():
        _fit(tiny_config(root / name, max_steps=2, **sections))
    return out


def _zero3_jobs(rank: int, world_size: int, root: str) -> dict:
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    trainer = _fit(tiny_config(Path(root) / "zero3", max_steps=2, engine={"name": "zero3"},
                               data={"eval_fraction": 0.01}))
    return {"eval_batches": trainer.evaluator.micro_batches, "weights": engine_weights(trainer)}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    formats = _write_inputs(root)
    fsdp2 = run_distributed(_fsdp2_jobs, root=str(root), formats=formats)
    zero3 = run_distributed(_zero3_jobs, root=str(root))
    return root, formats, fsdp2, zero3


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# The reference runs each rank's micro-batches through a plain model with the same weights, shapes and thread
# count, so every micro-batch's fp32 loss sum is the same number; only the float64 sum of those ~20 sums is
# taken in another order (relative error below 20 * 2^-53).
SAME_SUMS_RTOL = 1e-12


def _reference_loss(weights: dict[str, torch.Tensor], per_rank_batches: list[list[dict]]) -> float:
    """The held-out mean token loss of a plain one-process model with `weights` over the micro-batches each
    rank ran."""
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    model.load_state_dict(weights)
    model.eval()
    total = targets = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    with torch.no_grad():
        for batches in per_rank_batches:
            for batch in batches:
                logits = model(input_ids=batch["input_ids"], use_cache=False).logits
                labels = batch["labels"][:, 1:]
                total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                           ignore_index=-100, reduction="sum").item()
                targets += int((labels != -100).sum())
    torch.set_num_threads(threads)
    return total / targets


def test_evaluation_never_changes_training(jobs):
    _, _, fsdp2, _ = jobs
    with_eval, without = fsdp2[0]["with_eval"], fsdp2[0]["without_eval"]
    assert with_eval.keys() == without.keys()
    assert all(torch.equal(with_eval[name], without[name]) for name in with_eval)


def test_eval_rows_hold_the_sharded_loss_of_the_held_out_data(jobs):
    root, _, fsdp2, _ = jobs
    rows = [r for r in _rows(root / "with_eval") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    last = rows[-1]
    batches = [fsdp2[r]["eval_batches"] for r in (0, 1)]
    labelled = sum(int((b["labels"] != -100).any(dim=1).sum()) for rank in batches for b in rank)
    assert last["eval_sequences"] == labelled == EVAL_ROWS
    assert last["eval_perplexity"] == pytest.approx(math.exp(last["eval_loss"]))
    reference = _reference_loss(fsdp2[0]["with_eval"], batches)
    assert last["eval_loss"] == pytest.approx(reference, rel=SAME_SUMS_RTOL)
    assert rows[0]["eval_loss"] > last["eval_loss"]


def test_zero3_evaluates_a_held_out_fraction_like_one_process(jobs):
    root, _, _, zero3 = jobs
    (row,) = [r for r in _rows(root / "zero3") if "eval_loss" in r]
    batches = [zero3[r]["eval_batches"] for r in (0, 1)]
    labelled = sum(int((b["labels"] != -100).any(dim=1).sum()) for rank in batches for b in rank)
    assert row["step"] == 2 and row["eval_sequences"] == labelled == 12  # 1 % of the 1200 examples
    reference = _reference_loss(zero3[0]["weights"], batches)
    assert row["eval_loss"] == pytest.approx(reference, rel=SAME_SUMS_RTOL)


def test_evaluation_memory_stays_within_a_step(jobs):
    root, _, fsdp2, _ = jobs
    step_peaks = [max(r["peak_mem_gib_per_rank"]) for r in _rows(root / "with_eval") if "loss" in r]
    eval_peak = max(fsdp2[r]["eval_peak"] for r in (0, 1)) / 2 ** 30
    assert eval_peak <= min(step_peaks)


def test_tensorboard_events_hold_the_metrics_of_rank_0(jobs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _, _ = jobs
    event_files = list((root / "with_eval" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1  # rank 0 only
    events = EventAccumulator(str(event_files[0]), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    rows = _rows(root / "with_eval")
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                     ("tokens_per_s", "train/tokens_per_s"), ("peak_mem_gib", "train/peak_mem_gib"),
                     ("optim_state_gib", "train/optim_state_gib"), ("eval_loss", "eval/loss"),
                     ("eval_perplexity", "eval/perplexity")):
        expected = [(r["step"], np.float32(r[key])) for r in rows if key in r]
        assert [(e.step, np.float32(e.value)) for e in events.Scalars(tag)] == expected, tag
    layers = {e.step: e for e in events.Histograms("train/active_layers")}
    assert sorted(layers) == [1, 2, 3, 4]
    assert all(layers[r["step"]].histogram_value.num == len(r["active_layers"]) for r in rows if "loss" in r)


def test_wandb_offline_run_holds_the_metrics_of_rank_0(jobs):
    from tests.wandb_records import offline_history

    root, _, _, _ = jobs
    runs = list((root / "with_eval" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # rank 0 only
    history = offline_history(runs[0])
    rows = _rows(root / "with_eval")
    assert [h["train/loss"] for h in history if "train/loss" in h] == [r["loss"] for r in rows if "loss" in r]
    assert [h["eval/loss"] for h in history if "eval/loss" in h] == [r["eval_loss"] for r in rows if "eval_loss" in r]


@pytest.mark.parametrize("name", ["sharegpt", "text", "json_fields", "parquet", "saved", "chat_template"])
def test_every_data_format_trains_end_to_end_on_two_ranks(jobs, name):
    root, _, _, _ = jobs
    rows = _rows(root / name)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (root / name / "final" / "model.safetensors").is_file()
    assert any((root / name / "data_cache").iterdir())
