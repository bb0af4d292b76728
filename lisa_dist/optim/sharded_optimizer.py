"""Optimizer state and fp32 master copies for the trainable parameters' local shards only.

State is keyed by parameter name. `set_trainable` frees the state of parameters that left the trainable
set (LISA's switch), creates it for the ones that entered, and leaves the rest untouched. The same slots
serve updates after backward (`step`) and inside it (`lisa_dist.optim.fused`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from lisa_dist.engines.interfaces import ShardAccess
from lisa_dist.offload import to_host
from lisa_dist.optim.precision import stochastic_round_bf16
from lisa_dist.optim.rules import UpdateRule, squared_sum
from lisa_dist.optim.shard_info import ShardInfo, expert_part
from lisa_dist.values import READ, Values


@dataclass(slots=True)
class Slot:
    param: nn.Parameter
    name: str
    """The parameter's name."""
    key: str
    """The slot's key in `ShardedOptimizer.slots`: the name, or `expert_key` for an expert's part."""
    shard: torch.Tensor
    """The parameter's local shard in the training dtype, or the part of it `part` says (shares storage with the
    parameter)."""
    info: ShardInfo
    master: torch.Tensor | None
    """Persistent fp32 copy of `shard` (post-backward rules with a low-precision training dtype)."""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    step: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    """Updates applied, for checkpoints; `updates` is the same count as a Python number, which the rules read
    at every update without a host read of the tensor."""
    updates: int = 0
    grad_accum: torch.Tensor | None = None
    """fp32 sum of earlier micro-batches' gradient shards (low-precision training dtypes only)."""
    change_sq: torch.Tensor | None = None
    """Of the last update: the squared norm of this shard's change and of its value before it."""
    value_sq: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    """Of the last gradient measured: its squared norm as reduced (loss-scaled, before clipping)."""
    part: slice | None = None
    """lisa.unit=expert: the range of the flattened local shard this slot trains (one expert's elements); None:
    the whole shard. Only the parts have state; the rest of the shard is never updated."""
    folded: bool = False
    """A part's accumulator holds the last micro-batch's gradient already (its parameter's gradient is freed
    once every part has it)."""


def expert_key(name: str, expert: int) -> str:
    """The slot key of `expert`'s part of parameter `name`."""
    return f"{name}#{expert}"


@dataclass(slots=True)
class UpdateOptions:
    lr: float
    grad_scale: float | torch.Tensor = 1.0
    """Multiplies each gradient (1 / loss scale x norm-clipping factor); a 0-dim tensor on the device where the
    factor comes from a norm that was not read to the host."""
    clip_value: float = 0.0
    generator: torch.Generator | None = None
    """Set for stochastic rounding into bf16."""
    commit: torch.Tensor | None = None
    """A 0-dim bool on the device, decided without a host read: False makes every update a no-op (weights and
    state stay as they were, bit for bit). `ShardedOptimizer.settle` takes back the update counts once the step
    has read it."""


class ShardedOptimizer:
    def __init__(self, rule: UpdateRule, access: ShardAccess, values: Values = READ,
                 host: torch.device | None = None) -> None:
        self.rule = rule
        self.access = access
        self.values = values
        self.host = host
        """Set: state and masters live on this device and visit the shard's device only for an update."""
        self.slots: dict[str, Slot] = {}
        """By slot key: a parameter's name, or `expert_key` for an expert's part."""
        self.by_param: dict[str, list[Slot]] = {}
        self.uncommitted: list[Slot] = []
        """Slots updated under a commit flag the host has not read yet (`settle`)."""
        self.on_shard_device: Callable[[], AbstractContextManager[None]] = nullcontext
        """Context around the work done where a shard lives (its new state, its fp32 gradient, its update):
        with FSDP2's parameter offload that is host memory, which `estimate` counts apart."""

    def set_trainable(self, params: dict[str, nn.Parameter],
                      experts: dict[str, tuple[int, ...]] | None = None) -> tuple[list[str], list[str]]:
        """Returns (entered, left) slot keys. `experts`: for parameters stacked by expert, the experts to train
        (lisa.unit=expert); each is a slot of its own (`expert_key`), the rest of the parameter has no state."""
        wanted = {}
        for name, param in params.items():
            chosen = (experts or {}).get(name)
            for expert in [None] if chosen is None else chosen:
                wanted[name if expert is None else expert_key(name, expert)] = (name, param, expert)
        left = [key for key in self.slots if key not in wanted]
        entered = [key for key in wanted if key not in self.slots]
        self.by_param = {}
        for key in left:  # free before allocating, so a switch never holds both sets at once
            del self.slots[key]
        kept = self.slots
        # Slots follow the model's parameter order, so reductions over them (the gradient norm) sum in
        # the same order however the trainable set was reached: a resumed run matches bit for bit.
        self.slots = {}
        with self.on_shard_device():
            for key, (name, param, expert) in wanted.items():
                self.slots[key] = kept.pop(key) if key in kept else self._new_slot(name, param, expert)
        self.by_param = {}
        for slot in self.slots.values():
            self.by_param.setdefault(slot.name, []).append(slot)
        return entered, left

    def _new_slot(self, name: str, param: nn.Parameter, expert: int | None = None) -> Slot:
        shard = self.access.local_shard(param)
        info = self.access.shard_info(param)
        part = None
        if expert is not None:
            assert shard.is_contiguous(), f"{name}: an expert's part must be a view of a contiguous shard"
            part, info = expert_part(info, expert)
            shard = shard.view(-1)[part]
        keep_master = not self.rule.fused and shard.dtype != torch.float32
        master = shard.detach().to(torch.float32, copy=True) if keep_master else None
        state = self.rule.init_state(master if master is not None else shard.detach().float(), info)
        if self.host is not None:
            master = None if master is None else to_host(master, self.host)
            state = {key: to_host(t, self.host) for key, t in state.items()}
        return Slot(param=param, name=name, key=name if expert is None else expert_key(name, expert), shard=shard,
                    info=info, master=master, state=state, part=part)

    def slots_of(self, name: str) -> list[Slot]:
        """The slots of parameter `name`: the whole shard's, or its experts' parts (none if it does not train)."""
        return self.by_param.get(name, [])

    def _grad(self, slot: Slot) -> torch.Tensor | None:
        """This rank's gradient of the slot's shard or part (a view of the engine's gradient)."""
        grad = self.access.local_grad(slot.param)
        return grad if grad is None or slot.part is None else grad.view(-1)[slot.part]

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def state_bytes(self) -> int:
        total = 0
        for slot in self.slots.values():
            tensors = list(slot.state.values()) + ([slot.master] if slot.master is not None else [])
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def stash_grad(self, name: str) -> None:
        """Move a low-precision gradient shard, or any gradient of experts' parts, into the slots' fp32
        accumulators and free it.

        The engine reduces each micro-batch's gradient in fp32 but hands it back in the parameter dtype;
        summing micro-batches here keeps one rounding per micro-batch instead of compounding them. A stacked
        parameter trained for some experts gets a gradient for all of them: keeping only the parts frees the
        rest at once (the engine would sum an fp32 gradient in place, in the same order as here)."""
        slots = self.slots_of(name)
        grad = self.access.local_grad(slots[0].param) if slots else None
        if grad is None or (grad.dtype == torch.float32 and slots[0].part is None):
            return
        with self.on_shard_device():
            for slot in slots:
                piece = self._grad(slot)
                if slot.grad_accum is None:
                    slot.grad_accum = piece.clone() if piece.dtype == torch.float32 else piece.float()
                else:
                    slot.grad_accum.add_(piece)
        self.access.release_grad(slots[0].param)

    def full_grad(self, slot: Slot) -> torch.Tensor | None:
        """This step's fp32 gradient shard: the accumulator plus the last micro-batch's gradient. The last
        gradient is folded in once (and freed, but for a part, whose parameter's other parts still need it), so
        asking again (the norm, then the update) gives the same sum."""
        grad = self._grad(slot)
        if slot.grad_accum is None:
            with self.on_shard_device():
                return None if grad is None else grad.float()
        if grad is not None and not slot.folded:
            slot.grad_accum.add_(grad)
            slot.folded = slot.part is not None
            if slot.part is None:
                self.access.release_grad(slot.param)
        return slot.grad_accum

    def measure_grad(self, slot: Slot) -> torch.Tensor:
        """This step's squared gradient norm of the shard (as `full_grad` would give it), kept as `grad_sq`.
        A low-precision gradient is summed in fp32 as it is read, without an fp32 copy of it."""
        grad = self._grad(slot) if slot.grad_accum is None else self.full_grad(slot)
        slot.grad_sq = squared_sum(grad)
        return slot.grad_sq

    def has_grad(self, slot: Slot) -> bool:
        """Whether the shard has a gradient this step (the last micro-batch's, or an accumulated one)."""
        return self.access.local_grad(slot.param) is not None or slot.grad_accum is not None

    def grad_sq_sum(self) -> torch.Tensor:
        """Sum of squared local gradient shards (fp32), before any scaling."""
        sq = torch.zeros((), dtype=torch.float32)
        for slot in self.slots.values():
            if self.has_grad(slot) and slot.shard.numel():
                grad_sq = self.measure_grad(slot)
                sq = sq.to(grad_sq.device) + grad_sq
        return sq

    @torch.no_grad()
    def apply(self, slot: Slot, grad: torch.Tensor, options: UpdateOptions, guard: bool = False) -> torch.Tensor:
        """Update one shard from its gradient, which is consumed (scaled and zeroed in place). With `guard`,
        a shard whose gradient is not finite keeps its value (and the rule sees zeros), without a host sync.
        Returns 1 if the gradient was non-finite. Besides the rule's own, one temporary of the shard's size:
        its value before the update, for the change sums and the guard."""
        return self.apply_many([slot], [grad], options, guard)[0]

    @torch.no_grad()
    def apply_many(self, slots: list[Slot], grads: list[torch.Tensor], options: UpdateOptions,
                   guard: bool = False, grad_sqs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """`apply` to several shards at once, through the rule's multi-tensor form (`update_many`).

        The guard reads each gradient's squared sum (`grad_sqs`, as the fused path has already measured it
        for the norm) instead of a pass of its own over the shard: a sum is finite only if every element is.
        Scaled by grad_scale^2 it bounds every scaled element's square, so a shard passes only if its scaled
        gradient is finite; one whose squared norm overflows fp32 (a norm above 1.8e19) is held back too."""
        with self.on_shard_device():
            return self._apply_many(slots, grads, options, guard, grad_sqs)

    def _apply_many(self, slots: list[Slot], grads: list[torch.Tensor], options: UpdateOptions, guard: bool,
                    grad_sqs: list[torch.Tensor] | None) -> list[torch.Tensor]:
        grads32, commit, finite, keep = self._prepared_grads(grads, options, guard, grad_sqs)
        masters, states = self._counted_state(slots)
        if commit is not None:
            self.uncommitted.extend(slots)
        targets = [master if master is not None else slot.shard.float() for master, slot in zip(masters, slots)]
        befores = [target.clone() for target in targets]
        self.rule.update_many(targets, grads32, states, [slot.updates for slot in slots], options.lr,
                              [slot.info for slot in slots], commit)
        restore = finite if self.rule.keeps_master_when_held else keep  # the commit flag: the rule did it
        for target, before, ok in zip(targets, befores, restore):
            torch.where(ok, target, before, out=target)
        for slot, master, state, target, before, ok in zip(slots, masters, states, targets, befores,
                                                           keep or [None] * len(slots)):
            # For the per-layer relative change ||dW|| / ||W||: two sums per shard, reduced per layer by the core.
            slot.value_sq = squared_sum(before)
            slot.change_sq = squared_sum(before.sub_(target))
            if self.host is not None:
                for key, t in state.items():
                    slot.state[key].copy_(t)
                if master is not None:
                    slot.master.copy_(master)
            if target is not slot.shard:
                self._write_shard(slot, target, options.generator, ok)
        del befores
        return [(~ok).to(torch.int64) for ok in finite] if guard else [torch.zeros((), dtype=torch.int64)] * len(slots)

    def _prepared_grads(self, grads: list[torch.Tensor], options: UpdateOptions, guard: bool,
                        grad_sqs: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], torch.Tensor | None,
                                                                      list[torch.Tensor], list[torch.Tensor]]:
        """fp32 gradients scaled and clipped by value; the commit flag where they are; per shard, whether the
        gradient is finite (guarded) and whether its update stands. A held-back shard's gradient is zeroed for a
        rule that takes it into its state."""
        grads32 = [grad.float() for grad in grads]  # no copy when already fp32 (accumulated, or reduced in fp32)
        grad_scale, commit = options.grad_scale, options.commit
        if grads32 and isinstance(grad_scale, torch.Tensor):  # shards in host memory (FSDP2's offload) wait here
            grad_scale = grad_scale.to(grads32[0].device)
        if grads32 and commit is not None:
            commit = commit.to(grads32[0].device)
        if isinstance(grad_scale, torch.Tensor) or grad_scale != 1.0:
            torch._foreach_mul_(grads32, grad_scale)
        finite = self._finite(grads32, grad_scale, grad_sqs) if guard else []
        keep = self._keep(finite, commit, len(grads32))
        if self.rule.needs_finite_grads:  # NaN * 0 would still be NaN
            for g, ok in zip(grads32, keep):
                g.masked_fill_(~ok, 0.0)
        if options.clip_value:
            torch._foreach_clamp_min_(grads32, -options.clip_value)
            torch._foreach_clamp_max_(grads32, options.clip_value)
        return grads32, commit, finite, keep

    def _counted_state(self, slots: list[Slot]) -> tuple[list[torch.Tensor | None], list[dict[str, torch.Tensor]]]:
        """Each slot's update counted, and its master and state where the update runs."""
        masters, states = [], []
        for slot in slots:
            slot.step += 1
            slot.updates += 1
            master, state = slot.master, slot.state
            if self.host is not None:  # offloaded: this shard's state comes to the device for its update only
                device = slot.shard.device
                master = None if master is None else master.to(device, non_blocking=True)
                state = {key: t.to(device, non_blocking=True) for key, t in state.items()}
            masters.append(master)
            states.append(state)
        return masters, states

    @staticmethod
    def _keep(finite: list[torch.Tensor], commit: torch.Tensor | None, count: int) -> list[torch.Tensor]:
        """Per shard, whether its update stands (0-dim bools on the device): finite where guarded, and the
        step's commit. Empty: every update stands."""
        if commit is None:
            return finite
        return [ok & commit for ok in finite] if finite else [commit] * count

    @staticmethod
    def _write_shard(slot: Slot, target: torch.Tensor, generator: torch.Generator | None,
                     keep: torch.Tensor | None) -> None:
        """The updated fp32 value into the training-dtype shard. Stochastic rounding draws afresh, so a shard
        whose update was held back keeps its old rounding rather than a new one of the same value."""
        if generator is None or slot.shard.dtype != torch.bfloat16:
            slot.shard.copy_(target)
            return
        rounded = stochastic_round_bf16(target, generator)
        slot.shard.copy_(rounded if keep is None else torch.where(keep, rounded, slot.shard))

    def _finite(self, grads32: list[torch.Tensor], grad_scale: float,
                grad_sqs: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Per shard, whether its scaled gradient is finite (0-dim bools, no host sync)."""
        sqs = grad_sqs if grad_sqs is not None else [squared_sum(g) for g in grads32]
        scale_sq = grad_scale ** 2 if grad_sqs is not None else 1.0
        return [torch.isfinite(sq * scale_sq) for sq in sqs]

    def step(self, options: UpdateOptions) -> int:
        """Post-backward update of every trainable shard with a gradient, in `update_runs`; returns how many
        were updated."""
        pending = [slot for slot in self.slots.values() if self.has_grad(slot)]
        for run in self.update_runs(pending):
            self._apply_group(pending[run], options)
        return len(pending)

    def settle(self, committed: bool) -> None:
        """Once the step has read its commit flag: updates that did not stand are not counted."""
        if not committed:
            for slot in self.uncommitted:
                slot.step -= 1
                slot.updates -= 1
        self.uncommitted = []

    def update_runs(self, slots: list[Slot]) -> list[slice]:
        """`slots` cut, in order, into runs of parameters of at most the largest trainable parameter's
        elements: the multi-tensor kernels run over many shards at once while the fp32 gradients,
        values-before and rule temporaries they need stay about what one shard at a time needs for the
        largest. Cut by whole parameters' sizes, which every rank agrees on (shards of uneven splits differ
        between ranks), so rules that reduce across ranks per run (AdaLomo) issue the same collectives on
        every rank. With offloaded state, one at a time (each shard's state visits the device alone)."""
        budget = max((slot.info.global_numel for slot in self.slots.values()), default=0) if self.host is None else 0
        runs, start, size = [], 0, 0
        for i, slot in enumerate(slots):
            if i > start and size + slot.info.global_numel > budget:
                runs.append(slice(start, i))
                start, size = i, 0
            size += slot.info.global_numel
        if start < len(slots):
            runs.append(slice(start, len(slots)))
        return runs

    def _apply_group(self, group: list[Slot], options: UpdateOptions) -> None:
        grads = [self.full_grad(slot) for slot in group]
        self.apply_many(group, grads, options)

    def take_change_sums(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (squared change, squared value before)} of the shards updated since the last call."""
        sums = {}
        for name, slot in self.slots.items():
            if slot.change_sq is not None:
                sums[name] = (slot.change_sq, slot.value_sq)
                slot.change_sq = slot.value_sq = None
        return sums

    def take_grad_sums(self) -> dict[str, torch.Tensor]:
        """{name: squared gradient norm} of the shards measured since the last call."""
        sums = {}
        for name, slot in self.slots.items():
            if slot.grad_sq is not None:
                sums[name], slot.grad_sq = slot.grad_sq, None
        return sums

    def zero_grad(self, model: nn.Module) -> None:
        for param in model.parameters():
            self.access.release_grad(param)
        for slot in self.slots.values():
            slot.grad_accum = None
            slot.folded = False

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Local tensors (shared with the live state, so loading into them restores it), by slot key. An expert's
        part is stored as this rank holds it, keyed `name#e@start:end` by its range of the expert's flat elements
        (ZeRO-3's partitions may cut an expert); a rank holding none of an expert stores nothing for it."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, slot in self.slots.items():
            if slot.part is not None:
                if not slot.info.numel:
                    continue
                key = f"{key}@{slot.info.flat_start}:{slot.info.flat_start + slot.info.numel}"
            entry = dict(slot.state)
            entry["step"] = slot.step
            if slot.master is not None:
                entry["master"] = slot.master
            out[key] = entry
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copy `state` (as `state_dict` gives it, for the same trainable set) into the live state.
        Checkpoints skip the copy: DCP loads into `state_dict()`'s tensors in place, then `after_load`."""
        live = self.state_dict()
        if sorted(live) != sorted(state) or any(sorted(live[n]) != sorted(state[n]) for n in live):
            raise ValueError(f"optimizer state for {sorted(state)[:3]}... does not match the trainable "
                             f"parameters {sorted(live)[:3]}...")
        for name, entries in state.items():
            for key, value in entries.items():
                live[name][key].copy_(value)
        self.after_load()

    @torch.no_grad()
    def after_load(self) -> None:
        """Masters were restored from the checkpoint; the low-precision shards are rounded copies of them."""
        for slot in self.slots.values():
            slot.updates = int(self.values.item(slot.step))
            if slot.master is not None:
                slot.shard.copy_(slot.master)

