"""Data as users have it: ShareGPT, plain text, JSON arrays, parquet, `save_to_disk` directories, field
mappings, a model's own chat template, the tokenized cache and the held-out split."""

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from lisa_dist.data import (IGNORE_INDEX, TokenizedCache, TokenizedExample, build_sequences, load_examples,
                            split_held_out)
from lisa_dist.errors import DataError
from lisa_dist.evaluate import Evaluator
from tests.helpers import CHATML, labelled_runs, write_jsonl


CONVERSATION = [("system", "Answer briefly."), ("user", "Reverse the word.\nwolf"), ("assistant", "flow"),
                ("user", "What is the capital of Peru?"), ("assistant", "Lima")]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def _chat_record(turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _sharegpt_record(turns):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[role], "value": content} for role, content in turns]}


def test_sharegpt_records_tokenize_exactly_like_the_same_chat_messages(tmp_path, tokenizer):
    turns = CONVERSATION
    chat = load_examples(write_jsonl(tmp_path / "c.jsonl", [json.dumps(_chat_record(turns))]), tokenizer)
    sharegpt = load_examples(write_jsonl(tmp_path / "s.jsonl", [json.dumps(_sharegpt_record(turns))]), tokenizer)
    assert sharegpt == chat
    # A top-level system field (LLaMA-Factory's sharegpt layout) is the same as a system turn.
    record = {"system": "Answer briefly.", **_sharegpt_record(turns[1:])}
    assert load_examples(write_jsonl(tmp_path / "t.jsonl", [json.dumps(record)]), tokenizer) == chat


def test_a_template_with_a_system_prompt_labels_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    chatml = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    chatml.chat_template = CHATML
    for turns in (CONVERSATION, CONVERSATION[1:]):  # an explicit system prompt, and the template's default
        (example,) = load_examples(write_jsonl(tmp_path / "c.jsonl", [json.dumps(_chat_record(turns))]), chatml)
        messages = _chat_record(turns)["messages"]
        assert example.input_ids == chatml.encode(chatml.apply_chat_template(messages, tokenize=False),
                                                  add_special_tokens=False)
        runs = [chatml.decode(run) for run in labelled_runs(example)]
        assert runs == ["flow</s>\n", "Lima</s>\n"]
        unlabelled = chatml.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
        assert "You are helpful." in unlabelled or "Answer briefly." in unlabelled
        assert unlabelled.count("<|im_start|>assistant") == 2


def test_plain_text_is_labelled_on_every_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"text": "the moon rises"})])
    (example,) = load_examples(path, tokenizer)
    assert example.labels == example.input_ids
    assert tokenizer.decode(example.input_ids) == "<s>the moon rises</s>"


def _alpaca_rows(count=6):
    return [json.loads(line) for line in TINY_ALPACA.read_text().splitlines()[:count]]


def test_a_json_array_parquet_and_a_saved_dataset_give_the_examples_of_the_jsonl(tmp_path, tokenizer):
    rows = _alpaca_rows()
    expected = load_examples(write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in rows]), tokenizer)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("a.json", "a.parquet", "saved", "saved_dict"):
        assert load_examples(tmp_path / source, tokenizer) == expected, source


def test_fields_map_a_format_onto_other_keys(tmp_path, tokenizer):
    rows = _alpaca_rows()
    expected = load_examples(write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in rows]), tokenizer)
    renamed = [{"q": r["instruction"], "context": r.get("input", ""), "a": r["output"]} for r in rows]
    path = write_jsonl(tmp_path / "r.jsonl", [json.dumps(r) for r in renamed])
    fields = {"instruction": "q", "input": "context", "output": "a"}
    assert load_examples(path, tokenizer, fields=fields) == expected
    with pytest.raises(DataError, match=r"r\.jsonl:1: missing key 'answer' \(data\.fields\.output\)"):
        load_examples(path, tokenizer, fields={**fields, "output": "answer"})


@pytest.mark.parametrize("source, content, expected", [
    ("bad.json", '[{"instruction": "a", "output": "b"}, 3]', r"bad\.json\[1\]: expected a JSON object, got int"),
    ("bad.json", '[{"instruction": "a",', r"bad\.json:1: invalid JSON"),
    ("bad.jsonl", json.dumps({"conversations": [{"from": "bot", "value": "x"}]}),
     r"bad\.jsonl:1: conversations\[0\] has unknown 'from' 'bot'"),
    ("bad.jsonl", json.dumps({"conversations": [{"from": "human", "value": "x"}]}),
     r"bad\.jsonl:1: no assistant message"),
    ("bad.jsonl", json.dumps({"text": 5}), r"bad\.jsonl:1: 'text' must be a string, got int"),
    ("bad.parquet", "not parquet", r"bad\.parquet: cannot read it as parquet"),
])
def test_malformed_records_in_any_source_name_the_file_and_record(tmp_path, tokenizer, source, content, expected):
    (tmp_path / source).write_text(content)
    with pytest.raises(DataError, match=expected):
        load_examples(tmp_path / source, tokenizer)


def test_a_directory_that_is_not_a_saved_dataset_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="not a datasets.save_to_disk dataset"):
        load_examples(tmp_path / "d", tokenizer)
    table = datasets.Dataset.from_list(_alpaca_rows())
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match="without a 'train' split"):
        load_examples(tmp_path / "no_train", tokenizer)


def test_the_cache_is_read_back_and_keyed_by_the_data_and_the_tokenizer(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in _alpaca_rows()])
    first = TokenizedCache(tmp_path / "cache")
    examples = first.load(path, tokenizer, "auto", None)
    first.write()
    assert first.hits == [] and len(list((tmp_path / "cache").iterdir())) == 1

    import lisa_dist.data.cache as cache

    monkeypatch.setattr(cache, "load_examples", lambda *a, **k: pytest.fail("tokenized again"))
    second = TokenizedCache(tmp_path / "cache")
    assert second.load(path, tokenizer, "auto", None) == examples and len(second.hits) == 1
    monkeypatch.undo()

    changed = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    changed.chat_template = CHATML
    for data_path, tok in ((write_jsonl(tmp_path / "b.jsonl", [json.dumps(r) for r in _alpaca_rows(5)]), tokenizer),
                           (path, changed)):
        other = TokenizedCache(tmp_path / "cache")
        other.load(data_path, tok, "auto", None)
        assert other.hits == [] and other.pending
    (next((tmp_path / "cache").iterdir())).write_bytes(b"torn")  # a damaged file is made again
    torn = TokenizedCache(tmp_path / "cache")
    assert torn.load(path, tokenizer, "auto", None) == examples and torn.hits == []


def _examples(count):
    return [TokenizedExample(input_ids=[i, i + 1, i + 2], labels=[IGNORE_INDEX, i + 1, i + 2]) for i in range(count)]


def test_the_held_out_split_is_fixed_by_the_seed_and_disjoint():
    examples = _examples(40)
    train, held = split_held_out(examples, 0.25, seed=3)
    assert len(held) == 10 and len(train) == 30
    assert sorted(e.input_ids[0] for e in train + held) == list(range(40))
    assert split_held_out(examples, 0.25, seed=3) == (train, held)
    assert split_held_out(examples, 0.25, seed=4)[1] != held
    with pytest.raises(DataError, match="data.eval_fraction=0.99 of 40 examples"):
        split_held_out(examples, 0.99, seed=3)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("max_batches", [0, 1])
def test_every_rank_runs_the_same_forwards_and_each_sequence_counts_once(world_size, max_batches):
    sequences = build_sequences(_examples(11), 4, pad_id=0, pack=False)
    per_rank = [Evaluator(sequences, 4, 2, max_batches, rank, world_size).micro_batches for rank in range(world_size)]
    assert len({tuple(len(b["input_ids"]) for b in batches) for batches in per_rank}) == 1
    labelled = [row.tolist() for batches in per_rank for b in batches
                for row, labels in zip(b["input_ids"], b["labels"]) if (labels != IGNORE_INDEX).any()]
    count = 4 if max_batches else 11
    assert sorted(labelled) == sorted(sequences.input_ids[:count].tolist())
    fillers = sum(int((b["labels"] == IGNORE_INDEX).all(dim=1).sum()) for batches in per_rank for b in batches)
    assert fillers == -(-count // world_size) * world_size - count
    assert all(torch.equal(b["attention_mask"][(b["labels"] == IGNORE_INDEX).all(dim=1)].sum(), torch.tensor(0))
               for batches in per_rank for b in batches)
