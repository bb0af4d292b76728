"""Work done the moment a gradient shard is ready: LOMO-style fused updates (applied, then freed), and
fp32 accumulation of micro-batches for every optimizer.

The engine calls the hook on a parameter once its gradient shard has been reduced (FSDP2: the
post-accumulate-grad hooks it runs on sharded parameters after reduce-scatter). Only one FSDP unit's
gradients are alive at a time, and there is no gradient left after backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lisa_dist.errors import FusedPathError
from lisa_dist.optim.rules import squared_sum
from lisa_dist.optim.sharded import ShardedOptimizer, UpdateOptions


GradHookRegistrar = Callable[[nn.Parameter, Callable[[nn.Parameter], None]], RemovableHandle]


def register_fused_hooks(named_params: dict[str, nn.Parameter], register: GradHookRegistrar,
                         on_grad: Callable[[str, nn.Parameter], None]) -> list[RemovableHandle]:
    """One hook per parameter; returns the handles so the caller can remove them."""
    handles = []
    for name, param in named_params.items():
        handles.append(register(param, lambda p, name=name: on_grad(name, p)))
    return handles


class GradHooks:
    """Drives one backward pass at a time in `check` mode (measure, discard), `apply` mode (update), or
    `accumulate` mode (post-backward optimizers: only sum micro-batches in fp32)."""

    def __init__(self, optimizer: ShardedOptimizer, named_params: dict[str, nn.Parameter],
                 register: GradHookRegistrar) -> None:
        self.optimizer = optimizer
        self.handles = register_fused_hooks(named_params, register, self._on_grad)
        self.mode: Literal["check", "apply", "accumulate"] = "apply"
        self.options = UpdateOptions(lr=0.0)
        self.guard = True
        self.final_micro_batch = True
        self.seen: set[str] = set()
        self.sq_sum: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None

    def begin_pass(self, mode: Literal["check", "apply", "accumulate"], options: UpdateOptions, guard: bool) -> None:
        self.mode, self.options, self.guard = mode, options, guard
        self.seen = set()
        self.sq_sum = None
        self.nonfinite = None

    def _accumulate(self, sq: torch.Tensor, bad: torch.Tensor) -> None:
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad

    @torch.no_grad()
    def _on_grad(self, name: str, param: nn.Parameter) -> None:
        slot = self.optimizer.slots.get(name)
        if slot is None:
            return
        if not self.final_micro_batch:
            self.optimizer.stash_grad(name)  # LISA with accumulation: only active shards get here
            return
        if self.mode == "accumulate":
            return  # the post-backward optimizer takes the last micro-batch's gradient from the engine
        grad32 = self.optimizer.full_grad(slot)
        self.seen.add(name)
        sq = slot.grad_sq = squared_sum(grad32)
        if self.mode == "check":
            self._accumulate(sq, (~torch.isfinite(sq)).to(torch.int64))
        else:
            self._accumulate(sq, self.optimizer.apply(slot, grad32, self.options, guard=self.guard))
        self.optimizer.access.release_grad(param)  # the point of fusing: the memory goes right here
        slot.grad_accum = None

    def end_pass(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Local (sum of squared gradients, count of non-finite shards); raises if a parameter was missed."""
        missing = [n for n in self.optimizer.slots if n not in self.seen]
        if missing:
            raise FusedPathError(
                f"the fused {self.mode} pass did not run for {len(missing)} trainable parameters "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): their gradients never reached the "
                "engine's post-reduce hooks, so they were neither applied nor freed")
        leftover = [n for n, p in model.named_parameters() if self.optimizer.access.local_grad(p) is not None]
        if leftover:
            raise FusedPathError(f"gradients left after a fused pass: {', '.join(leftover[:4])}")
        zero = torch.zeros(())
        return (self.sq_sum if self.sq_sum is not None else zero,
                self.nonfinite if self.nonfinite is not None else zero.long())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
