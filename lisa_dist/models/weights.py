"""Read only the rows of each weight that a rank's shard needs; seeded random init independent of sharding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lisa_dist.errors import WeightsError
from lisa_dist.models.keys import map_checkpoint_keys


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

    def _key(self, name: str) -> str:
        if name in self.keys.stored:
            return self.keys.stored[name]
        if name in self.keys.converted:
            raise WeightsError(f"{self.directory}: {name} is stored as {self.keys.converted[name]!r} in a layout "
                               "transformers converts while loading (merging or splitting tensors), which "
                               "lisa_dist cannot read row by row; re-save the model once with "
                               "from_pretrained(...).save_pretrained(...)")
        raise WeightsError(f"{self.directory}: weight {name!r} is missing from the checkpoint")

    def _slice(self, name: str) -> Any:
        key = self._key(name)
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path].get_slice(key)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

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
        """Rows [start, end) of dim 0 (the whole tensor for scalars)."""
        view = self._slice(name)
        try:
            return view[...] if len(view.get_shape()) == 0 else view[start:end]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise WeightsError(f"{self.files[self._key(name)]}: reading {name} failed ({e})") from None

    def close(self) -> None:
        self._handles.clear()


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"lisa_dist/init/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_init(name: str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """The same full fp32 tensor on every rank and for every world size."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(_param_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)
