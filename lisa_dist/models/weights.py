"""Read only the rows of each weight that a rank's shard needs; seeded random init independent of sharding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open


class WeightsError(ValueError):
    """The checkpoint directory does not hold what the model needs."""


class SafetensorsReader:
    def __init__(self, directory: Path, base_model_prefix: str = "") -> None:
        self.directory = directory
        self.prefix = base_model_prefix
        self.files: dict[str, Path] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: directory / v for k, v in weight_map.items()}
        else:
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(path, framework="pt") as f:
                    self.files.update({k: path for k in f.keys()})
        if not self.files:
            raise WeightsError(f"{directory} holds no safetensors weights")
        self._handles: dict[Path, object] = {}

    def _key(self, name: str) -> str:
        candidates = [name]
        if self.prefix:
            candidates += [name.removeprefix(self.prefix + "."), f"{self.prefix}.{name}"]
        for key in candidates:
            if key in self.files:
                return key
        raise WeightsError(f"{self.directory}: weight {name!r} is missing from the checkpoint")

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def shape(self, name: str) -> list[int]:
        key = self._key(name)
        return list(self._handle(self.files[key]).get_slice(key).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        key = self._key(name)
        stored = self._handle(self.files[key]).get_slice(key).get_dtype()
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                  "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}
        return dtypes.get(stored, torch.uint8)

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
        key = self._key(name)
        view = self._handle(self.files[key]).get_slice(key)
        if len(view.get_shape()) == 0:
            return view[...]
        return view[start:end]

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
