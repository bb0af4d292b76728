"""Optimizer state and fp32 master copies for the trainable parameters' local shards only.

State is keyed by parameter name. `set_trainable` frees the state of parameters that left the trainable
set (LISA's switch), creates it for the ones that entered, and leaves the rest untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lisa_dist.optim.rules import UpdateRule


@dataclass(slots=True)
class _Slot:
    param: nn.Parameter
    shard: torch.Tensor
    """The parameter's local shard in the training dtype (shares storage with the parameter)."""
    master: torch.Tensor | None
    """fp32 copy of `shard` when the training dtype is lower precision."""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    step: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))


class ShardedOptimizer:
    def __init__(
        self,
        rule: UpdateRule,
        local_shard: Callable[[nn.Parameter], torch.Tensor],
        local_grad: Callable[[nn.Parameter], torch.Tensor | None],
    ) -> None:
        self.rule = rule
        self.local_shard = local_shard
        self.local_grad = local_grad
        self.slots: dict[str, _Slot] = {}

    def set_trainable(self, params: dict[str, nn.Parameter]) -> tuple[list[str], list[str]]:
        """Returns (entered, left) parameter names."""
        left = [name for name in self.slots if name not in params]
        entered = [name for name in params if name not in self.slots]
        for name in left:  # free before allocating, so a switch never holds both sets at once
            del self.slots[name]
        kept = self.slots
        # Slots follow the model's parameter order, so reductions over them (the gradient norm) sum in
        # the same order however the trainable set was reached: a resumed run matches bit for bit.
        self.slots = {}
        for name, param in params.items():
            self.slots[name] = kept.pop(name) if name in kept else self._new_slot(param)
        return entered, left

    def _new_slot(self, param: nn.Parameter) -> _Slot:
        shard = self.local_shard(param)
        master = shard.detach().to(torch.float32, copy=True) if shard.dtype != torch.float32 else None
        return _Slot(param=param, shard=shard, master=master,
                     state=self.rule.init_state(master if master is not None else shard))

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def state_bytes(self) -> int:
        total = 0
        for slot in self.slots.values():
            tensors = list(slot.state.values()) + ([slot.master] if slot.master is not None else [])
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def grad_norm(self) -> float:
        """Global L2 norm of the trainable gradients: shard-local sums, one all-reduce."""
        sq = torch.zeros((), dtype=torch.float32)
        device = None
        for slot in self.slots.values():
            grad = self.local_grad(slot.param)
            if grad is not None and grad.numel():
                device = grad.device
                sq = sq.to(device) + grad.float().pow(2).sum()
        if dist.is_initialized():
            device = device or _group_device()
            sq = sq.to(device)
            dist.all_reduce(sq)
        return math.sqrt(float(sq))

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> int:
        """Apply the rule to every trainable shard with a gradient; returns how many were updated."""
        updated = 0
        for slot in self.slots.values():
            grad = self.local_grad(slot.param)
            if grad is None:
                continue
            updated += 1
            slot.step += 1
            if grad.numel() == 0:
                continue
            grad32 = grad.float()
            if grad_scale != 1.0:
                grad32 = grad32 * grad_scale
            target = slot.master if slot.master is not None else slot.shard
            self.rule.update(target, grad32, slot.state, int(slot.step), lr)
            if slot.master is not None:
                slot.shard.copy_(slot.master)
        return updated

    def zero_grad(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.grad = None

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Local tensors (shared with the live state, so loading into them restores it)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, slot in self.slots.items():
            entry = dict(slot.state)
            entry["step"] = slot.step
            if slot.master is not None:
                entry["master"] = slot.master
            out[name] = entry
        return out

    @torch.no_grad()
    def after_load(self) -> None:
        """Masters were restored from the checkpoint; the bf16 shards are rounded copies of them."""
        for slot in self.slots.values():
            if slot.master is not None:
                slot.shard.copy_(slot.master)


def _group_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")
