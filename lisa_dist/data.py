"""Instruction data: JSON-lines loading, response-only labels, fixed-length sequences, global batches."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from lisa_dist.errors import CheckpointError, ConfigError, DataError

IGNORE_INDEX = -100
FORMATS = ("auto", "alpaca", "chat")
ROLES = ("system", "user", "assistant")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """`IGNORE_INDEX` on prompt tokens, the token id on response tokens (unshifted)."""


@dataclass(frozen=True, slots=True)
class SequenceSet:
    input_ids: Tensor
    """[num_sequences, seq_len] int64."""
    labels: Tensor
    """[num_sequences, seq_len] int64, `IGNORE_INDEX` on prompt and padding."""
    attention_mask: Tensor
    """[num_sequences, seq_len] int64, 0 on padding."""
    num_dropped: int
    """Examples (pad) or packed chunks (pack) dropped because no labelled token was left."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def fingerprint(self) -> str:
        """A digest of every token and label: ranks reading different copies of "the same" file disagree."""
        digest = hashlib.sha256()
        for t in (self.input_ids, self.labels, self.attention_mask):
            digest.update(memoryview(t.contiguous().numpy()).cast("B"))
        return digest.hexdigest()[:16]

    def repeated_to(self, num_sequences: int) -> SequenceSet:
        """At least `num_sequences` rows, repeating the set (for shape-only uses such as `estimate`)."""
        if len(self) >= num_sequences:
            return self
        times = -(-num_sequences // len(self))
        return SequenceSet(input_ids=self.input_ids.repeat(times, 1), labels=self.labels.repeat(times, 1),
                           attention_mask=self.attention_mask.repeat(times, 1), num_dropped=self.num_dropped)


def format_alpaca_prompt(instruction: str, input_text: str) -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def load_examples(path: str | Path, tokenizer: Tokenizer, fmt: str = "auto") -> list[TokenizedExample]:
    """Tokenize a JSON-lines file of Alpaca (`instruction`/`input`/`output`) or chat (`messages`) records."""
    if fmt not in FORMATS:
        raise ValueError(f"data format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; responses must end with one")
    records = _read_records(Path(path))
    if fmt == "auto":
        fmt = _detect_format(path, *records[0])
    tokenize = _tokenize_alpaca if fmt == "alpaca" else _tokenize_chat
    return [tokenize(f"{path}:{line_number}", record, tokenizer) for line_number, record in records]


def _read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; expected a JSON-lines data file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); expected a JSON-lines data file") from None
    records = []
    # Split on "\n" only: str.splitlines would also break on U+2028, which JSON strings may contain.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno}); "
                            "expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        records.append((line_number, record))
    if not records:
        raise DataError(f"{path}: no examples; expected one JSON object per line")
    return records


def _detect_format(path: str | Path, line_number: int, record: dict[str, Any]) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    raise DataError(f"{path}:{line_number}: cannot tell the data format from keys {sorted(record)}; expected "
                    "'instruction' and 'output' (alpaca) or 'messages' (chat)")


def _require_str(where: str, record: dict[str, Any], key: str, *, default: str | None = None) -> str:
    if key not in record:
        if default is not None:
            return default
        raise DataError(f"{where}: missing key {key!r}; expected keys {sorted(record) + [key]}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _tokenize_alpaca(where: str, record: dict[str, Any], tokenizer: Tokenizer) -> TokenizedExample:
    instruction = _require_str(where, record, "instruction")
    input_text = _require_str(where, record, "input", default="")
    output = _require_str(where, record, "output")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    prompt = bos + tokenizer.encode(format_alpaca_prompt(instruction, input_text), add_special_tokens=False)
    response = tokenizer.encode(output, add_special_tokens=False) + [tokenizer.eos_token_id]
    return TokenizedExample(input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response)


def _validate_messages(where: str, record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" not in record:
        raise DataError(f"{where}: missing key 'messages'; expected a list of {{'role', 'content'}} objects")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{index}] has unknown role {message['role']!r}; "
                            f"expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: messages[{index}]['content'] must be a string, "
                            f"got {type(message['content']).__name__}")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message; expected at least one to train on")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _tokenize_chat(where: str, record: dict[str, Any], tokenizer: Tokenizer) -> TokenizedExample:
    messages = _validate_messages(where, record)
    if getattr(tokenizer, "chat_template", None):
        segments = _template_segments(where, messages, tokenizer)
    else:
        segments = _plain_segments(messages, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_response in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if is_response and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        input_ids += ids
        labels += ids if is_response else [IGNORE_INDEX] * len(ids)
    return TokenizedExample(input_ids=input_ids, labels=labels)


def _template_segments(where: str, messages: list[dict[str, str]],
                       tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_response) pieces.

    Each assistant response is the text between the render that ends in a generation prompt and the
    render that includes the response, so role markers stay unlabelled whatever the template looks like.
    """
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _render(where, tokenizer, messages[:index], add_generation_prompt=True)
            segments.append((_suffix(where, rendered, prompt), False))
            rendered = prompt
        full = _render(where, tokenizer, messages[:index + 1], add_generation_prompt=False)
        segments.append((_suffix(where, rendered, full), message["role"] == "assistant"))
        rendered = full
    return [segment for segment in segments if segment[0] or segment[1]]


def _render(where: str, tokenizer: Tokenizer, messages: list[dict[str, str]],
            add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    # Templates raise whatever jinja or their own raise_exception throws; report it against the line.
    except Exception as error:
        raise DataError(f"{where}: the tokenizer's chat template failed: {error}") from error


def _suffix(where: str, prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise DataError(f"{where}: the chat template renders a conversation differently from its prefix, "
                        "so assistant turns cannot be located; expected an append-only template")
    return text[len(prefix):]


def _plain_segments(messages: list[dict[str, str]], tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    bos = "" if tokenizer.bos_token_id is None else getattr(tokenizer, "bos_token", "")
    segments: list[tuple[str, bool]] = [(bos, False)]
    for message in messages:
        if message["role"] == "assistant":
            segments += [("Assistant:\n", False), (message["content"], True)]
        else:
            segments.append((f"{message['role'].capitalize()}:\n{message['content']}\n", False))
    return [segment for segment in segments if segment[0] or segment[1]]


def build_sequences(examples: list[TokenizedExample], seq_len: int, pad_id: int, pack: bool) -> SequenceSet:
    """Turn examples into [N, seq_len] tensors: one padded row per example, or packed chunks."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    rows, num_dropped = _packed_rows(examples, seq_len) if pack else _padded_rows(examples, seq_len)
    if not rows:
        raise DataError(f"no sequence has a response token within seq_len={seq_len} "
                        f"({len(examples)} examples); increase seq_len or shorten the prompts")
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.int64)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        labels[row, :len(ids)] = torch.tensor(row_labels, dtype=torch.int64)
        attention_mask[row, :len(ids)] = 1
    return SequenceSet(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                       num_dropped=num_dropped)


def _has_label(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def _padded_rows(examples: list[TokenizedExample], seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    rows = [(example.input_ids[:seq_len], example.labels[:seq_len]) for example in examples]
    kept = [row for row in rows if _has_label(row[1])]
    return kept, len(rows) - len(kept)


def _packed_rows(examples: list[TokenizedExample], seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    stream_ids = [token for example in examples for token in example.input_ids]
    stream_labels = [label for example in examples for label in example.labels]
    num_chunks = max(len(stream_ids) // seq_len, 1)
    rows = [(stream_ids[start:start + seq_len], stream_labels[start:start + seq_len])
            for start in range(0, num_chunks * seq_len, seq_len)]
    kept = [row for row in rows if _has_label(row[1])]
    return kept, len(rows) - len(kept)


class GlobalBatches:
    """Deterministic global batches, sliced per rank and split into micro-batches.

    The global batch for a step depends only on (seed, step), never on the world size, so runs with
    different numbers of ranks see the same data and a resume needs nothing but the step.
    """

    def __init__(self, sequences: SequenceSet, global_batch_size: int, micro_batch_size: int,
                 rank: int, world_size: int, seed: int) -> None:
        _validate_batch_sizes(len(sequences), global_batch_size, micro_batch_size, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.sequences = sequences
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = len(sequences) // global_batch_size
        self._permutation_cache: tuple[int, Tensor] | None = None
        self._fingerprint: str | None = None

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def epoch_of(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> Tensor:
        """Indices into the sequences of every rank's samples for `step`, in rank order."""
        epoch = self.epoch_of(step)
        start = (step % self.steps_per_epoch) * self.global_batch_size
        return self._permutation(epoch)[start:start + self.global_batch_size]

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        per_rank = self.global_batch_size // self.world_size
        rank_indices = self.global_indices(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [self._gather(indices) for indices in rank_indices.split(self.micro_batch_size)]

    def state_dict(self) -> dict[str, int | str]:
        if self._fingerprint is None:
            self._fingerprint = self.sequences.fingerprint()
        return {"seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_sequences": len(self.sequences), "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        current = self.state_dict()
        mismatched = [f"{key}: checkpoint {state.get(key)} vs now {value}"
                      for key, value in current.items() if state.get(key) != value
                      and not (key == "fingerprint" and key not in state)]  # checkpoints from before it existed
        if mismatched:
            raise CheckpointError("cannot resume data order; the checkpoint was made with different data or "
                             f"batching ({'; '.join(mismatched)})")

    def _permutation(self, epoch: int) -> Tensor:
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutation_cache = (epoch, torch.randperm(len(self.sequences), generator=generator))
        return self._permutation_cache[1]

    def _gather(self, indices: Tensor) -> dict[str, Tensor]:
        return {"input_ids": self.sequences.input_ids[indices],
                "labels": self.sequences.labels[indices],
                "attention_mask": self.sequences.attention_mask[indices]}


def _validate_batch_sizes(num_sequences: int, global_batch_size: int, micro_batch_size: int,
                          world_size: int) -> None:
    if global_batch_size < 1 or micro_batch_size < 1 or world_size < 1:
        raise ConfigError(f"train.global_batch_size ({global_batch_size}), train.micro_batch_size "
                         f"({micro_batch_size}) and the world size ({world_size}) must be positive")
    if global_batch_size % (micro_batch_size * world_size):
        raise ConfigError(f"train.global_batch_size ({global_batch_size}) must be divisible by "
                         f"train.micro_batch_size ({micro_batch_size}) x world size ({world_size}) "
                         f"= {micro_batch_size * world_size}")
    if num_sequences < global_batch_size:
        raise DataError(f"the dataset has {num_sequences} sequences, fewer than one global batch "
                         f"(train.global_batch_size = {global_batch_size}); add data or lower it")
