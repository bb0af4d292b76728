"""Tokenized examples as fixed-length sequences, the held-out split, and the global batches of each step."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from lisa_dist.data.formats import IGNORE_INDEX, TokenizedExample
from lisa_dist.errors import CheckpointError, ConfigError, DataError


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


def split_held_out(examples: list[TokenizedExample], fraction: float,
                   seed: int) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """(training, held-out): a seeded choice of `fraction` of the examples, made before packing so no
    sequence mixes the two, and independent of the world size."""
    count = max(1, round(fraction * len(examples)))
    if not 1 <= count < len(examples):
        raise DataError(f"data.eval_fraction={fraction} of {len(examples)} examples holds out {count}; it must "
                        "leave at least one example on each side")
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


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
