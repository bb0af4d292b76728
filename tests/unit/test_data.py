"""Pure-logic tests for lisa_dist.data, using the bundled tiny tokenizer."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from lisa_dist.assets import TINY_ALPACA, TINY_CHAT, TINY_MODEL_DIR
from lisa_dist.data import (IGNORE_INDEX, GlobalBatches, SequenceSet, TokenizedExample,
                            build_sequences, load_examples)
from lisa_dist.errors import CheckpointError, ConfigError, DataError
from tests.helpers import labelled_runs, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)



def test_alpaca_labels_only_response(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [
        json.dumps({"instruction": "Reverse the word.", "input": "cat", "output": "tac"}),
        json.dumps({"instruction": "What is 2 + 3?", "output": "5"}),
    ])
    with_input, without_input = load_examples(path, tokenizer)
    for example, output, prompt_text in [(with_input, "tac", "cat"), (without_input, "5", "2 + 3")]:
        assert example.input_ids[0] == tokenizer.bos_token_id
        runs = labelled_runs(example)
        assert len(runs) == 1
        assert tokenizer.decode(runs[0]) == output + tokenizer.eos_token
        assert example.input_ids[-len(runs[0]):] == runs[0]
        prompt = tokenizer.decode(example.input_ids[:-len(runs[0])])
        assert prompt_text in prompt and prompt.endswith("### Response:\n")
    assert "### Input:" not in tokenizer.decode(without_input.input_ids)


def test_chat_multi_turn_labels_each_assistant_turn_only(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse the word.\nwolf"},
        {"role": "assistant", "content": "flow"},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"messages": messages})])
    (example,) = load_examples(path, tokenizer)
    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    assert runs == ["flow</s>", "Lima</s>"]
    labelled_text = "".join(runs)
    for text in ("Answer", "Reverse", "capital", "User", "Assistant"):
        assert text not in labelled_text
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer.encode(full, add_special_tokens=False)


def test_chat_without_template_falls_back_to_plain_markers(tmp_path, tokenizer):
    plain = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    plain.chat_template = None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"messages": messages})])
    (example,) = load_examples(path, plain, fmt="chat")
    assert [plain.decode(run) for run in labelled_runs(example)] == ["Hello</s>"]
    assert example.input_ids[0] == plain.bos_token_id


def test_auto_format_and_bundled_files(tokenizer):
    alpaca = load_examples(TINY_ALPACA, tokenizer)
    chat = load_examples(TINY_CHAT, tokenizer)
    assert len(alpaca) == 1200 and len(chat) == 300
    assert all(labelled_runs(example) for example in alpaca + chat)
    assert max(len(example.input_ids) for example in alpaca + chat) <= 64


ERROR_CASES = {
    "not json": ("{oops", "invalid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object, got list"),
    "missing key": (json.dumps({"instruction": "x"}), "missing key 'output'"),
    "wrong type": (json.dumps({"instruction": "x", "output": 3}), "'output' must be a string, got int"),
    "empty messages": (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    "unknown role": (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), "unknown role 'tool'"),
    "message not object": (json.dumps({"messages": ["hi"]}), "messages[0] must be an object"),
    "no assistant": (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_malformed_line_names_file_and_line(tmp_path, tokenizer, case):
    bad_line, expected = ERROR_CASES[case]
    fmt = "chat" if "messages" in bad_line else "alpaca"
    good = {"alpaca": {"instruction": "a", "output": "b"},
            "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}}[fmt]
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(good), "", bad_line])
    with pytest.raises(DataError) as error:
        load_examples(path, tokenizer, fmt=fmt)
    assert str(error.value).startswith(f"{path}:3: ")
    assert expected in str(error.value)


def test_auto_format_rejects_unknown_keys(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", ["", json.dumps({"prompt": "x"})])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: cannot tell the data format"):
        load_examples(path, tokenizer)


def test_file_level_errors(tmp_path, tokenizer):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError) as error:
        load_examples(missing, tokenizer)
    assert str(error.value).startswith(f"{missing}: file not found")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError) as error:
        load_examples(empty, tokenizer)
    assert str(error.value).startswith(f"{empty}: no examples")
    with pytest.raises(ValueError, match="data format must be one of"):
        load_examples(TINY_ALPACA, tokenizer, fmt="csv")


def example(length: int, prompt_length: int) -> TokenizedExample:
    ids = list(range(10, 10 + length))
    return TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt_length + ids[prompt_length:])


def test_padded_sequences_truncate_and_mask():
    examples = [example(5, 2), example(12, 3), example(9, 8)]
    sequences = build_sequences(examples, seq_len=8, pad_id=0, pack=False)
    assert sequences.input_ids.shape == sequences.labels.shape == sequences.attention_mask.shape == (2, 8)
    assert sequences.input_ids.dtype == sequences.labels.dtype == sequences.attention_mask.dtype == torch.int64
    assert sequences.num_dropped == 1
    assert sequences.input_ids[0].tolist() == [10, 11, 12, 13, 14, 0, 0, 0]
    assert sequences.labels[0].tolist() == [-100, -100, 12, 13, 14, -100, -100, -100]
    assert sequences.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert sequences.input_ids[1].tolist() == list(range(10, 18))
    assert sequences.attention_mask[1].tolist() == [1] * 8


def test_packed_sequences_concatenate_and_drop_partial_chunk():
    examples = [example(5, 2), example(6, 1), example(7, 3)]
    sequences = build_sequences(examples, seq_len=4, pad_id=0, pack=True)
    stream = [token for e in examples for token in e.input_ids]
    assert sequences.input_ids.shape == (4, 4)
    assert sequences.input_ids.flatten().tolist() == stream[:16]
    assert sequences.labels.flatten().tolist() == [label for e in examples for label in e.labels][:16]
    assert bool(sequences.attention_mask.eq(1).all())
    single = build_sequences([example(3, 1)], seq_len=8, pad_id=0, pack=True)
    assert single.input_ids.shape == (1, 8)
    assert single.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_no_labelled_sequence_is_an_error():
    with pytest.raises(DataError, match="no sequence has a response token"):
        build_sequences([example(10, 8)], seq_len=4, pad_id=0, pack=False)


@pytest.fixture(scope="module")
def sequences() -> SequenceSet:
    examples = [example(3 + i % 5, 1) for i in range(50)]
    return build_sequences(examples, seq_len=8, pad_id=0, pack=False)


def concatenated(batches: GlobalBatches, step: int) -> torch.Tensor:
    return torch.cat([micro["input_ids"] for micro in batches.micro_batches(step)])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_partition_the_global_batch(sequences, world_size):
    reference = GlobalBatches(sequences, 8, 8, rank=0, world_size=1, seed=3)
    ranks = [GlobalBatches(sequences, 8, 2, rank=rank, world_size=world_size, seed=3) for rank in range(world_size)]
    assert ranks[0].accumulation_steps == 4 // world_size
    for step in (0, 1, 7, 12):
        expected = sequences.input_ids[reference.global_indices(step)]
        assert torch.equal(concatenated(reference, step), expected)
        union = torch.cat([concatenated(batches, step) for batches in ranks])
        assert torch.equal(union, expected)
        for micro in ranks[0].micro_batches(step):
            assert set(micro) == {"input_ids", "labels", "attention_mask"}
            assert micro["input_ids"].shape == (2, 8)
    assert not torch.equal(reference.global_indices(0), reference.global_indices(1))


def test_epochs_cover_data_once_and_reshuffle(sequences):
    batches = GlobalBatches(sequences, 8, 4, rank=0, world_size=1, seed=0)
    assert batches.steps_per_epoch == 6
    epoch0 = torch.cat([batches.global_indices(step) for step in range(6)])
    epoch1 = torch.cat([batches.global_indices(step) for step in range(6, 12)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not torch.equal(epoch0, epoch1)
    assert [batches.epoch_of(step) for step in (0, 5, 6, 13)] == [0, 0, 1, 2]


def test_order_is_deterministic_and_ignores_global_rng(sequences):
    first = GlobalBatches(sequences, 8, 4, rank=1, world_size=2, seed=5)
    torch.manual_seed(123)
    second = GlobalBatches(sequences, 8, 4, rank=1, world_size=2, seed=5)
    rng_state = torch.get_rng_state()
    for step in (9, 0, 3):  # out of order: each step stands alone
        assert torch.equal(concatenated(first, step), concatenated(second, step))
    assert torch.equal(rng_state, torch.get_rng_state())
    other_seed = GlobalBatches(sequences, 8, 4, rank=1, world_size=2, seed=6)
    assert not torch.equal(concatenated(first, 0), concatenated(other_seed, 0))


def test_batch_size_validation(sequences):
    with pytest.raises(ConfigError) as error:
        GlobalBatches(sequences, 6, 2, rank=0, world_size=4, seed=0)
    message = str(error.value)
    assert "train.global_batch_size (6)" in message and "train.micro_batch_size (2)" in message
    assert "world size (4)" in message
    with pytest.raises(DataError, match="fewer than one global batch"):
        GlobalBatches(sequences, 64, 2, rank=0, world_size=1, seed=0)


def test_state_dict_round_trip_and_mismatch(sequences):
    batches = GlobalBatches(sequences, 8, 2, rank=0, world_size=2, seed=1)
    resumed = GlobalBatches(sequences, 8, 4, rank=1, world_size=2, seed=1)
    resumed.load_state_dict(batches.state_dict())
    smaller = SequenceSet(sequences.input_ids[:40], sequences.labels[:40], sequences.attention_mask[:40], 0)
    with pytest.raises(CheckpointError, match="num_sequences: checkpoint 50 vs now 40"):
        GlobalBatches(smaller, 8, 2, rank=0, world_size=2, seed=1).load_state_dict(batches.state_dict())


def test_repeated_to_fills_a_global_batch_for_shape_only_uses():
    import torch

    from lisa_dist.data import SequenceSet

    rows = torch.arange(6).reshape(3, 2)
    small = SequenceSet(input_ids=rows, labels=rows + 10, attention_mask=torch.ones_like(rows), num_dropped=1)
    assert small.repeated_to(2) is small
    filled = small.repeated_to(7)
    assert len(filled) == 9 and torch.equal(filled.input_ids[3:6], rows) and torch.equal(filled.labels[6:], rows + 10)
