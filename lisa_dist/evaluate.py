"""Held-out evaluation, sharded like training: the mean token loss (and perplexity) over the held-out
sequences, computed without gradients on every rank's share and reduced once.

Sequence i goes to rank i mod world size, in micro-batches of `train.micro_batch_size`; ranks short of a
sequence run a row with no labelled token, so every rank runs the same forwards (each one gathers
parameters collectively). The sums, and so the loss, do not depend on the world size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lisa_dist.core import TrainingCore
from lisa_dist.data import IGNORE_INDEX, SequenceSet
from lisa_dist.distributed import all_reduce_sum
from lisa_dist.steps import Batch


@dataclass(frozen=True, slots=True)
class EvalResult:
    step: int
    loss: float
    """Mean token loss over the labelled tokens of the held-out sequences."""
    tokens: int
    """Labelled tokens evaluated."""
    sequences: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a float beyond ~709

    def record(self) -> dict[str, float | int]:
        """The metrics.jsonl row of this evaluation."""
        return {"step": self.step, "eval_loss": self.loss, "eval_perplexity": self.perplexity,
                "eval_tokens": self.tokens, "eval_sequences": self.sequences}


class Evaluator:
    def __init__(self, sequences: SequenceSet, global_batch_size: int, micro_batch_size: int, max_batches: int,
                 rank: int, world_size: int) -> None:
        """`max_batches`: at most this many global batches of `global_batch_size` sequences; 0 = all."""
        count = len(sequences) if not max_batches else min(len(sequences), max_batches * global_batch_size)
        self.num_sequences = count
        rows = list(range(rank, count, world_size))
        per_rank = -(-count // world_size)
        self.micro_batches = [_rows(sequences, rows[start:start + micro_batch_size], micro_batch_size, start, per_rank)
                              for start in range(0, per_rank, micro_batch_size)]

    def run(self, core: TrainingCore, step: int) -> EvalResult:
        loss_sum, targets = core.eval_loss(self.micro_batches)
        total_loss, total_targets = all_reduce_sum([loss_sum, targets], core.runtime.device)
        return EvalResult(step=step, loss=total_loss / max(total_targets, 1.0), tokens=int(total_targets),
                          sequences=self.num_sequences)


def _rows(sequences: SequenceSet, rows: list[int], micro_batch_size: int, start: int, per_rank: int) -> Batch:
    """The sequences at `rows`, and rows without a label up to this micro-batch's size on every rank."""
    size = min(micro_batch_size, per_rank - start)
    index = torch.tensor(rows, dtype=torch.int64)
    batch = {"input_ids": sequences.input_ids[index], "labels": sequences.labels[index],
             "attention_mask": sequences.attention_mask[index]}
    missing = size - len(rows)
    if missing:
        seq_len = sequences.input_ids.shape[1]
        # The pad id of a row without labels does not matter: it only runs the forward.
        filler = {"input_ids": sequences.input_ids[:1].expand(missing, seq_len),
                  "labels": torch.full((missing, seq_len), IGNORE_INDEX, dtype=torch.int64),
                  "attention_mask": torch.zeros((missing, seq_len), dtype=torch.int64)}
        batch = {key: torch.cat([batch[key], filler[key]]) for key in batch}
    return batch
