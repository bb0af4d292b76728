"""Where a rank's shard sits in its parameter, and row/column statistics of a flat slice of a matrix.

A shard is the contiguous range [flat_start, flat_start + numel) of the row-major flattened parameter.
That holds for FSDP2's dim-0 shards (whole rows) and for ZeRO-3's flat partitions (rows may be cut), so
rules that need whole-matrix statistics work on either and reduce only small vectors across ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ShardInfo:
    global_shape: tuple[int, ...]
    flat_start: int
    numel: int
    reduce_sum: Callable[[torch.Tensor], None]
    """In-place sum over the ranks that hold shards of this parameter."""

    @property
    def global_numel(self) -> int:
        n = 1
        for d in self.global_shape:
            n *= d
        return n

    @property
    def matrix(self) -> tuple[int, int] | None:
        """(rows, cols) when the parameter is treated as a matrix (2 or more dims)."""
        if len(self.global_shape) < 2:
            return None
        return self.global_shape[0], self.global_numel // self.global_shape[0]


def local_shard_info(tensor: torch.Tensor) -> ShardInfo:
    """A whole, unsharded tensor (one process, or a replicated parameter)."""
    return ShardInfo(tuple(tensor.shape), 0, tensor.numel(), lambda t: None)


def _pieces(start: int, numel: int, cols: int) -> list[tuple[int, int, int, int, bool]]:
    """(local_lo, local_hi, row, col, whole_rows): a partial first row, whole rows, a partial last row."""
    end, pos, pieces = start + numel, start, []
    if pos % cols and pos < end:
        row = pos // cols
        hi = min(end, (row + 1) * cols)
        pieces.append((pos - start, hi - start, row, pos % cols, False))
        pos = hi
    whole = (end - pos) // cols
    if whole:
        pieces.append((pos - start, pos - start + whole * cols, pos // cols, 0, True))
        pos += whole * cols
    if pos < end:
        pieces.append((pos - start, end - start, pos // cols, 0, False))
    return pieces


def row_col_sums(flat: torch.Tensor, start: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This slice's contribution to the matrix's per-row and per-column sums."""
    row_sums = flat.new_zeros(rows)
    col_sums = flat.new_zeros(cols)
    for lo, hi, row, col, whole in _pieces(start, flat.numel(), cols):
        seg = flat[lo:hi]
        if whole:
            block = seg.view(-1, cols)
            row_sums[row:row + block.shape[0]] += block.sum(1)
            col_sums += block.sum(0)
        else:
            row_sums[row] += seg.sum()
            col_sums[col:col + seg.numel()] += seg
    return row_sums, col_sums


def outer_slice(row_factor: torch.Tensor, col_factor: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """The slice [start, start + numel) of the flattened outer product row_factor x col_factor."""
    cols = col_factor.numel()
    out = row_factor.new_empty(numel)
    for lo, hi, row, col, whole in _pieces(start, numel, cols):
        if whole:
            k = (hi - lo) // cols
            out[lo:hi].view(k, cols).copy_(row_factor[row:row + k, None] * col_factor[None, :])
        else:
            out[lo:hi] = row_factor[row] * col_factor[col:col + hi - lo]
    return out
