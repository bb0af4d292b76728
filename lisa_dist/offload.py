"""Activation offload: tensors saved for backward move to host memory and come back when backward needs them.

With activation checkpointing, what a decoder layer saves is its input (the rest is recomputed), so this
moves the 2 x hidden x seq_len bytes per layer off the card. Parameters (and views of them, such as the
transposed weight a linear saves) stay where they are: FSDP2 owns their memory. Small tensors stay too;
copying them costs more than they hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def offload_saved_tensors(host: torch.device, enabled: bool = True) -> Iterator[None]:
    """Saved tensors of at least 1 MiB go to `host` (pinned when they come from a GPU).

    Copies run on the compute stream, so a freed device block is only reused after its copy finished.
    `lisa-dist estimate` passes the meta device as host, so offloaded bytes are counted apart. On a CPU run
    the host is the device itself and the copy gains nothing (the tests use it to check the round trip)."""
    if not enabled:
        yield
        return

    def pack(t: torch.Tensor) -> torch.Tensor | tuple[torch.device, torch.Tensor]:
        if _is_parameter(t) or t.numel() * t.element_size() < MIN_OFFLOAD_BYTES:
            return t
        return t.device, to_host(t, host, non_blocking=True)

    def unpack(packed: torch.Tensor | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, stored = packed
        return stored.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
