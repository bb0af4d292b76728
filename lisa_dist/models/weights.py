"""Read only the rows of each weight that a rank's shard needs; seeded random init independent of sharding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lisa_dist.errors import WeightsError
from lisa_dist.models.keys import map_checkpoint_keys
from lisa_dist.randomness import derived_seed


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


def _open(path: Path) -> Any:
    """A safetensors handle; a truncated or corrupt file is a WeightsError naming it."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e}); it may be truncated (an "
                           "interrupted download or copy)") from None


class SafetensorsReader:
    """Rows of the stored weights of `model` (a meta-device copy is enough), looked up through the key
    renamings `from_pretrained` applies (`keys.map_checkpoint_keys`)."""

    def __init__(self, directory: Path, model: nn.Module) -> None:
        self.directory = directory
        self.files: dict[str, Path] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise WeightsError(f"{index}: not a safetensors index (no weight_map: {e})") from None
            missing = sorted({v for v in weight_map.values() if not (directory / v).is_file()})
            if missing:
                raise WeightsError(f"{index} lists {len(missing)} shard file(s) missing from {directory}: "
                                   f"{', '.join(missing[:3])}")
            self.files = {k: directory / v for k, v in weight_map.items()}
        else:
            for path in sorted(directory.glob("*.safetensors")):
                self.files.update({k: path for k in _open(path).keys()})
        if not self.files:
            raise WeightsError(f"{directory} holds no safetensors weights")
        self.keys = map_checkpoint_keys(model, list(self.files))
        self._handles: dict[Path, Any] = {}
        self.bytes_read = 0
        """Bytes of tensor data read so far."""

    def has(self, name: str) -> bool:
        return name in self.keys.stored or name in self.keys.merged

    def _key(self, name: str) -> str:
        """The stored key of `name`; for a parameter stacked from experts, expert 0's first one."""
        if name in self.keys.stored:
            return self.keys.stored[name]
        if name in self.keys.merged:
            merge = self.keys.merged[name]
            missing = merge.missing()
            if missing:
                raise WeightsError(f"{self.directory}: {name} is stored one tensor per expert, and {missing} is "
                                   "missing")
            return merge.expert_keys(0)[0]
        if name in self.keys.converted:
            raise WeightsError(f"{self.directory}: {name} is stored as {self.keys.converted[name]} in a layout "
                               "transformers converts while loading in a way lisa_dist cannot read row by row; "
                               "re-save the model once with from_pretrained(...).save_pretrained(...)")
        raise WeightsError(f"{self.directory}: weight {name!r} is missing from the checkpoint")

    def _slice_of_key(self, key: str) -> Any:
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path].get_slice(key)

    def _slice(self, name: str) -> Any:
        return self._slice_of_key(self._key(name))

    def shape(self, name: str) -> list[int]:
        if name not in self.keys.merged:
            return list(self._slice(name).get_shape())
        self._key(name)  # every expert is stored
        merge = self.keys.merged[name]
        shapes = [list(self._slice_of_key(k).get_shape()) for k in merge.expert_keys(0)]
        expert = shapes[0]
        expert[merge.concat_dim] = sum(shape[merge.concat_dim] for shape in shapes)
        return [merge.num_experts(), *expert]

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES.get(self._slice(name).get_dtype(), torch.uint8)

    def check(self, name: str, expected_shape: list[int]) -> None:
        """Raise WeightsError unless `name` is stored as floating point with `expected_shape`."""
        if not self.dtype(name).is_floating_point:
            raise WeightsError(f"{self.directory}: {name} is stored as {self.dtype(name)}, not a "
                               "floating-point type (quantized checkpoints are not supported)")
        if self.shape(name) != list(expected_shape):
            raise WeightsError(f"{self.directory}: {name} has shape {self.shape(name)}, "
                               f"the config expects {list(expected_shape)}")

    def read_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of dim 0 (the whole tensor for scalars); of a parameter stacked from experts,
        experts [start, end), each read whole and nothing else."""
        if name in self.keys.merged:
            return self._read_experts(name, start, end)
        return self._read(self._key(name), lambda view: view[...] if len(view.get_shape()) == 0 else view[start:end],
                          name)

    def read_expert_rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of a [experts, rows, cols] parameter viewed as [experts * rows, cols]: ZeRO-3's
        flat partitions, which may cut an expert, read within the experts they touch, never whole experts
        they only share rows with."""
        shape = self.shape(name)
        assert len(shape) == 3, "a stack of expert matrices"
        rows = shape[1]
        pieces = []
        for expert in range(first // rows, -(-last // rows)):
            lo, hi = max(first, expert * rows) - expert * rows, min(last, (expert + 1) * rows) - expert * rows
            pieces.append(self._expert_rows(name, expert, lo, hi))
        return torch.cat(pieces) if pieces else torch.empty([0, shape[-1]], dtype=self.dtype(name))

    def _expert_rows(self, name: str, expert: int, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of one expert's matrix."""
        if name not in self.keys.merged:
            rows = self._read(self._key(name), lambda view: view[expert:expert + 1, lo:hi])
            return rows[0]
        merge = self.keys.merged[name]
        keys = merge.expert_keys(expert)
        if merge.concat_dim != 0:
            return torch.cat([self._read(k, lambda view: view[lo:hi]) for k in keys], dim=merge.concat_dim)
        parts, offset = [], 0
        for key in keys:
            count = self._slice_of_key(key).get_shape()[0]
            a, b = max(lo, offset) - offset, min(hi, offset + count) - offset
            if a < b:
                parts.append(self._read(key, lambda view, a=a, b=b: view[a:b]))
            offset += count
        return torch.cat(parts)

    def _read(self, key: str, take: Any, what: str | None = None) -> torch.Tensor:
        """`take(slice)` of the stored tensor `key` (`what`: the name to report on failure), counted."""
        try:
            out = take(self._slice_of_key(key))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise WeightsError(f"{self.files[key]}: reading {what or key} failed ({e})") from None
        self.bytes_read += out.numel() * out.element_size()
        return out

    def _read_experts(self, name: str, start: int, end: int) -> torch.Tensor:
        merge = self.keys.merged[name]
        shape = self.shape(name)
        experts = [torch.cat([self._read(key, lambda view: view[...]) for key in merge.expert_keys(expert)],
                             dim=merge.concat_dim) for expert in range(start, min(end, shape[0]))]
        if not experts:
            return torch.empty([0, *shape[1:]], dtype=self.dtype(name))
        return torch.stack(experts)

    def read_buffers(self, model: nn.Module) -> None:
        """Copy the stored values of `model`'s persistent buffers (DeepSeek-V3's routing bias) into them;
        buffers a checkpoint does not store (rotary tables) keep the values the model computed."""
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if self.has(name):
                    buffer.copy_(self.read_rows(name, 0, buffer.shape[0] if buffer.dim() else 1))

    def close(self) -> None:
        self._handles.clear()


def random_init(name: str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """The same full fp32 tensor on every rank and for every world size."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(derived_seed("init", seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)
