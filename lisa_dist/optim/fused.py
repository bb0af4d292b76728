"""Work done the moment a gradient shard is ready: LOMO-style fused updates (applied, then freed), and
fp32 accumulation of micro-batches for every optimizer.

The engine calls the hook on a parameter once its gradient shard has been reduced (FSDP2: the
post-accumulate-grad hooks it runs on sharded parameters after reduce-scatter, one unit's parameters one
after another). The updates of a unit run together once its last gradient shard is in, through the rule's
multi-tensor form. Only one unit's gradients are alive at a time, and none is left after backward.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lisa_dist.errors import FusedPathError
from lisa_dist.optim.sharded_optimizer import ShardedOptimizer, UpdateOptions, Slot


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
    `accumulate` mode (post-backward optimizers: only sum micro-batches in fp32). In `accumulate` mode an
    `inactive` optimizer (lisa.inactive_update) updates its own parameters as in `apply` mode, by
    `inactive_options`."""

    def __init__(self, optimizer: ShardedOptimizer, named_params: dict[str, nn.Parameter],
                 register: GradHookRegistrar, units: list[list[nn.Parameter]],
                 inactive: ShardedOptimizer | None = None) -> None:
        """`units`: every parameter, by the groups whose gradient shards arrive together (the engine's
        `grad_units`); a unit's updates run once its last trainable gradient is in."""
        self.optimizer = optimizer
        self.inactive = inactive
        self.handles = register_fused_hooks(named_params, register, self._on_grad)
        self.unit_of = {id(p): i for i, unit in enumerate(units) for p in unit}
        self.pending: dict[int, list[Slot]] = {}
        self.expected: Counter[int] = Counter()
        self.mode: Literal["check", "apply", "accumulate"] = "apply"
        self.options = UpdateOptions(lr=0.0)
        self.inactive_options = UpdateOptions(lr=0.0)
        self.guard = True
        self.final_micro_batch = True
        self.seen: set[str] = set()
        self.sq_sum: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None

    def begin_pass(self, mode: Literal["check", "apply", "accumulate"], options: UpdateOptions, guard: bool,
                   inactive_options: UpdateOptions | None = None) -> None:
        self.mode, self.options, self.guard = mode, options, guard
        self.inactive_options = inactive_options or UpdateOptions(lr=0.0)
        self.seen = set()
        self.sq_sum = None
        self.nonfinite = None
        self.pending = {}
        applied = self._applied()
        self.expected = Counter(self.unit_of[id(slot.param)] for slot in applied.slots.values()) if applied else \
            Counter()

    def _applied(self) -> ShardedOptimizer | None:
        """The optimizer whose updates this pass runs in the hooks (accumulate mode: the inactive one, if any)."""
        return self.inactive if self.mode == "accumulate" else self.optimizer

    def _count_nonfinite(self, bad: list[torch.Tensor]) -> None:
        for b in bad:
            self.nonfinite = b if self.nonfinite is None else self.nonfinite + b

    @torch.no_grad()
    def _on_grad(self, name: str, param: nn.Parameter) -> None:
        slots = self.optimizer.slots_of(name)
        if not slots:
            if self.mode == "accumulate" and self.inactive is not None:
                self._on_applied_grad(param, self.inactive.slots_of(name), self.inactive)
            return
        if not self.final_micro_batch:
            self.optimizer.stash_grad(name)  # LISA with accumulation: only active shards get here
            return
        if self.mode == "accumulate":
            # The post-backward optimizer takes the last micro-batch's gradient from the engine; experts' parts
            # from their accumulators, so the rest of their parameter's gradient goes now.
            if slots[0].part is not None:
                self.optimizer.stash_grad(name)
            return
        self._on_applied_grad(param, slots, self.optimizer)

    def _on_applied_grad(self, param: nn.Parameter, slots: list[Slot], optimizer: ShardedOptimizer) -> None:
        if not slots:
            return
        if not self.final_micro_batch:
            optimizer.stash_grad(slots[0].name)
            return
        for slot in slots:
            self.seen.add(slot.key)
            sq = optimizer.measure_grad(slot)
            self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        if self.mode == "check":
            self._count_nonfinite([(~torch.isfinite(slot.grad_sq)).to(torch.int64) for slot in slots])
            self._release(slots, optimizer)
            return
        unit = self.unit_of[id(param)]
        arrived = self.pending.setdefault(unit, [])
        arrived.extend(slots)
        if len(arrived) == self.expected[unit]:
            self._apply(self.pending.pop(unit), optimizer)

    def _apply(self, arrived: list[Slot], optimizer: ShardedOptimizer) -> None:
        """Update a unit's shards together (`ShardedOptimizer.update_runs`), then free their gradients (a
        parameter's once its last slot, of an expert's part, is updated). The fp32 gradients (copies, for
        low-precision ones) are made a run at a time."""
        inactive = optimizer is not self.optimizer
        options, guard = (self.inactive_options, True) if inactive else (self.options, self.guard)
        remaining = Counter(slot.name for slot in arrived)
        for run in optimizer.update_runs(arrived):
            slots = arrived[run]
            grads = [optimizer.full_grad(slot) for slot in slots]
            self._count_nonfinite(optimizer.apply_many(slots, grads, options, guard=guard,
                                                       grad_sqs=[slot.grad_sq for slot in slots]))
            del grads
            remaining.subtract(slot.name for slot in slots)
            self._release([slot for slot in slots if remaining[slot.name] == 0], optimizer)

    @staticmethod
    def _release(slots: list[Slot], optimizer: ShardedOptimizer) -> None:
        """Free the gradients of these slots' parameters (each once) and their slots' accumulators."""
        for name in dict.fromkeys(slot.name for slot in slots):
            parts = optimizer.slots_of(name)
            optimizer.access.release_grad(parts[0].param)  # the point of fusing: the memory goes right here
            for part in parts:
                part.grad_accum = None
                part.folded = False

    def end_pass(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Local (sum of squared gradients, count of non-finite shards) of the updates run in the hooks; raises if
        a parameter they should have updated was missed or kept its gradient."""
        applied = self._applied()
        zero = torch.zeros(())
        if applied is None:
            return zero, zero.long()
        for unit in list(self.pending):  # units short of a gradient: update what came, then report the rest
            self._apply(self.pending.pop(unit), applied)
        missing = [n for n in applied.slots if n not in self.seen]
        if missing:
            raise FusedPathError(
                f"the fused {self.mode} pass did not run for {len(missing)} trainable parameters "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): their gradients never reached the "
                "engine's post-reduce hooks, so they were neither applied nor freed")
        kept = set() if applied is self.optimizer else set(self.optimizer.by_param)
        leftover = [n for n, p in model.named_parameters()
                    if n not in kept and self.optimizer.access.local_grad(p) is not None]
        if leftover:
            raise FusedPathError(f"gradients left after a fused pass: {', '.join(leftover[:4])}")
        return (self.sq_sum if self.sq_sum is not None else zero,
                self.nonfinite if self.nonfinite is not None else zero.long())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
