"""What autograd keeps of the tensors saved for backward: activations offloaded to host memory, and
parameters kept by reference.

Activation offload: with activation checkpointing, what a decoder layer saves is its input (the rest is
recomputed), so this moves the 2 x hidden x seq_len bytes per layer off the card. Parameters (and views of
them, such as the transposed weight a linear saves) stay where they are: the engine owns their memory.
Small tensors stay too; copying them costs more than they hold.

Parameters by reference: DeepSpeed ZeRO-3 releases a gathered parameter by pointing `param.data` at an
empty tensor. A view of the gathered weight saved for backward (the transpose a linear saves) keeps its
storage alive until that backward, so without checkpointing every weight of the forward stays gathered at
once. Kept by reference, the view is rebuilt from the parameter when backward needs it, after DeepSpeed
gathered it again for that module's backward. DeepSpeed's `memory_efficient_linear` does the same for
`F.linear` alone, by replacing it for the whole process. (FSDP2 frees the storage itself, views included.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20


def to_host(t: torch.Tensor, host: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """A copy of `t` on `host`, pinned when it comes from a GPU (so copies back can be asynchronous).

    Non-blocking is only safe when the copy is read back on the same stream before the host reads it."""
    stored = torch.empty(t.shape, dtype=t.dtype, device=host, pin_memory=t.is_cuda and host.type == "cpu")
    return stored.copy_(t, non_blocking=non_blocking)


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class _ParameterView(NamedTuple):
    """A saved view of a parameter's data, by its place in that data rather than by its storage."""

    param: nn.Parameter
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # relative to the parameter's own storage offset when the view was saved
    numel: int  # of the parameter's data then

    @classmethod
    def of(cls, view: torch.Tensor) -> _ParameterView | None:
        """None unless `view` is a view of the parameter's current data (same storage, same dtype)."""
        param = view._base
        if view.dtype != param.dtype or view.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
            return None
        return cls(param, tuple(view.shape), view.stride(), view.storage_offset() - param.storage_offset(),
                   param.numel())

    def rebuild(self) -> torch.Tensor:
        data = self.param.data
        if data.numel() != self.numel or not data.is_contiguous():
            raise RuntimeError(f"backward needs a saved view of a parameter of shape {tuple(data.shape)} "
                               f"({data.numel()} elements gathered, {self.numel} when it was saved): the engine "
                               "released it before that module's backward")
        return data.as_strided(self.size, self.stride, data.storage_offset() + self.offset)


class _Kept(NamedTuple):
    """A saved tensor kept as it is. Autograd checks no version of tensors that pass through saved-tensor
    hooks, so the check that an in-place change did not overwrite it is done here."""

    tensor: torch.Tensor
    version: int

    def check(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an "
                               f"inplace operation: a tensor of shape {tuple(self.tensor.shape)} is at version "
                               f"{self.tensor._version}; expected version {self.version} instead")
        return self.tensor


@contextlib.contextmanager
def offload_saved_tensors(host: torch.device, enabled: bool = True,
                          parameters_by_reference: bool = False) -> Iterator[None]:
    """Saved tensors of at least 1 MiB go to `host` (pinned when they come from a GPU), and, with
    `parameters_by_reference`, saved views of parameters are kept as references (the module docstring).

    Copies run on the compute stream, so a freed device block is only reused after its copy finished.
    `lisa-dist estimate` passes the meta device as host, so offloaded bytes are counted apart. On a CPU run
    the host is the device itself and the copy gains nothing (the tests use it to check the round trip)."""
    if not enabled and not parameters_by_reference:
        yield
        return

    def pack(t: torch.Tensor) -> torch.Tensor | _ParameterView | _Kept | tuple[torch.device, torch.Tensor]:
        if _is_parameter(t):
            # a parameter itself is kept as the same object, whose data the engine swaps back in
            view = _ParameterView.of(t) if parameters_by_reference and t._base is not None else None
            return t if view is None else view
        if not enabled or t.numel() * t.element_size() < MIN_OFFLOAD_BYTES:
            return _Kept(t, t._version)
        return t.device, to_host(t, host, non_blocking=True)

    def unpack(packed: torch.Tensor | _ParameterView | _Kept | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, _ParameterView):
            return packed.rebuild()
        if isinstance(packed, _Kept):
            return packed.check()
        device, stored = packed
        return stored.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
