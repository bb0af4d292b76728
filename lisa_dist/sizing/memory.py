"""Tensor-storage accounting for CPU runs, where there is no allocator to ask for a peak."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lisa_dist._compat import TorchDispatchMode, tree_flatten

GIB = float(1 << 30)
CARD_24GB_GIB = 22.35
"""A 24 GB card, in GiB."""
RESERVE_GIB = 0.85
"""Left on a card for the CUDA context and allocator fragmentation: 24 GB leaves 21.5 GiB for tensors."""


def print_categories(categories: dict[str, float]) -> None:
    """GiB by category, largest first, for `estimate` and `plan`."""
    for name, gib in sorted(categories.items(), key=lambda kv: -kv[1]):
        if gib > 0:
            print(f"  {name:24s} {gib:9.3f} GiB")


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    if hasattr(t, "__tensor_flatten__"):  # DTensor and other wrapper subclasses
        inner_names, _ = t.__tensor_flatten__()
        inner = [getattr(t, name) for name in inner_names]
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    if t.device.type == "meta":
        return []
    return [t.untyped_storage()]


class StorageTracker(TorchDispatchMode):
    """Counts bytes of live storages produced by ops inside the mode plus any registered up front.

    A storage is counted once however many views share it, and uncounted when it is freed, so `peak`
    is the high-water mark of distinct tensor memory while the mode was active.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for storage in _storages(t):
                    self._add(storage)

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self._sizes:
            return
        box = [storage.nbytes()]
        self._sizes[storage] = box
        self._grow(box[0])
        weakref.finalize(storage, self._release, box)

    def _release(self, box: list[int]) -> None:
        self.live -= box[0]

    def _grow(self, delta: int) -> None:
        self.live += delta
        self.peak = max(self.peak, self.live)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        box = self._sizes.get(storage)
        if box is None:
            self._add(storage)
            return
        size = storage.nbytes()
        self._grow(size - box[0])
        box[0] = size

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                for storage in _storages(t):
                    self._add(storage)
        return out

    def __enter__(self) -> StorageTracker:
        # FSDP2 frees and re-allocates unsharded parameters with storage.resize_, which is no dispatched op.
        self._original_resize = torch.UntypedStorage.resize_
        tracker, original = self, self._original_resize

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            tracker._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._original_resize
        super().__exit__(*args)
