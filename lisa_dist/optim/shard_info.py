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
    def matrix(self) -> tuple[int, int, int] | None:
        """(matrices, rows, cols) when the parameter is a stack of matrices over its last two dims: one for a
        2-D parameter, one per expert for a mixture-of-experts layer's [experts, rows, cols]; None below 2 dims."""
        if len(self.global_shape) < 2:
            return None
        rows, cols = self.global_shape[-2], self.global_shape[-1]
        return self.global_numel // max(rows * cols, 1), rows, cols


def expert_part(info: ShardInfo, expert: int) -> tuple[slice, ShardInfo]:
    """The part of a rank's shard of a parameter stacked by expert ([experts, ...]) that holds `expert`'s
    elements: its range in the flattened shard, and where it sits in that expert's own tensor (empty where the
    rank holds none of the expert)."""
    size = info.global_numel // info.global_shape[0]
    end = info.flat_start + info.numel
    lo = min(max(info.flat_start, expert * size), end)
    hi = max(min(end, (expert + 1) * size), lo)
    start = lo - expert * size if hi > lo else 0
    return slice(lo - info.flat_start, hi - info.flat_start), ShardInfo(info.global_shape[1:], start, hi - lo,
                                                                         info.reduce_sum)


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


def row_col_sums(flat: torch.Tensor, start: int, rows: int, cols: int,
                 matrices: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This slice's contribution to each matrix's per-row and per-column sums, of a stack of `matrices`
    matrices of `rows` x `cols`: [matrices * rows] row sums, [matrices * cols] column sums."""
    row_sums = flat.new_zeros(matrices * rows)
    col_sums = flat.new_zeros(matrices, cols)
    for lo, hi, row, col, whole in _pieces(start, flat.numel(), cols):
        seg = flat[lo:hi]
        if whole:
            block = seg.view(-1, cols)
            row_sums[row:row + block.shape[0]] += block.sum(1)
            for lo_row, hi_row, matrix in matrix_segments(row, block.shape[0], rows):  # whole rows by matrix
                col_sums[matrix] += block[lo_row:hi_row].sum(0)
        else:
            row_sums[row] += seg.sum()
            col_sums[row // rows, col:col + seg.numel()] += seg
    return row_sums, col_sums.reshape(-1)


def matrix_segments(start: int, numel: int, matrix_numel: int) -> list[tuple[int, int, int]]:
    """The flat slice [start, start + numel) of a stack of matrices cut at their boundaries: (local lo,
    local hi, matrix)."""
    out, position, end = [], start, start + numel
    while position < end:
        matrix = position // matrix_numel
        stop = min((matrix + 1) * matrix_numel, end)
        out.append((position - start, stop - start, matrix))
        position = stop
    return out


def per_matrix(values: torch.Tensor, start: int, numel: int, matrix_numel: int) -> torch.Tensor:
    """Each element of the flat slice [start, start + numel) given its matrix's entry of `values`."""
    segments = matrix_segments(start, numel, matrix_numel)
    counts = torch.tensor([hi - lo for lo, hi, _ in segments], device=values.device)
    chosen = values[torch.tensor([m for _, _, m in segments], device=values.device)]
    return chosen.repeat_interleave(counts, output_size=numel)


def outer_slice(row_factor: torch.Tensor, col_factor: torch.Tensor, start: int, numel: int,
                matrices: int = 1) -> torch.Tensor:
    """The slice [start, start + numel) of the flattened outer products row_factor x col_factor of a stack of
    `matrices` matrices (`row_factor` [matrices * rows], `col_factor` [matrices * cols])."""
    rows, cols = row_factor.numel() // matrices, col_factor.numel() // matrices
    by_matrix = col_factor.view(matrices, cols)
    out = row_factor.new_empty(numel)
    for lo, hi, row, col, whole in _pieces(start, numel, cols):
        if whole:
            for lo_row, hi_row, matrix in matrix_segments(row, (hi - lo) // cols, rows):  # whole rows by matrix
                torch.mul(row_factor[row + lo_row:row + hi_row, None], by_matrix[matrix][None, :],
                          out=out[lo + lo_row * cols:lo + hi_row * cols].view(hi_row - lo_row, cols))
        else:
            out[lo:hi] = row_factor[row] * by_matrix[row // rows, col:col + hi - lo]
    return out
