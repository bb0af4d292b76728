"""The training core: one object behind every entry point (`lisa-dist train`, `LisaDistTrainer`, `estimate`).

It owns the engine and its sharded model, the layer sampler, the sharded optimizer with its gradient
hooks, and the step runner (loss scaling, clipping, non-finite handling). Callers bring micro-batches and
a learning rate; the core switches the active layers, runs the step and says what happened.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lisa_dist.config import Config
from lisa_dist.data import IGNORE_INDEX
from lisa_dist.distributed import Runtime, sum_over_ranks, verify_same_across_ranks
from lisa_dist.engines import create_engine
from lisa_dist.engines.base import Engine, trainable_named_parameters
from lisa_dist.errors import NonFiniteStepsError
from lisa_dist.importance import InputNorms, linear_modules, outlier_ratios
from lisa_dist.models import ModelSource, sampling_units, set_trainable_units
from lisa_dist.models.moe import router_modules
from lisa_dist.optim import ShardedOptimizer, make_rule
from lisa_dist.optim.rules import make_inactive_rule
from lisa_dist.optim.sharded_optimizer import expert_key
from lisa_dist.optim.fused import GradHooks
from lisa_dist.sampler import LayerSampler, make_strategy
from lisa_dist.steps import Batch, FusedStep, LossFn, PostBackwardStep
from lisa_dist.validation import strategy_options
from lisa_dist.values import READ, Values

__all__ = ["Batch", "LossFn", "StepResult", "TrainingCore"]


@dataclass(slots=True)
class StepResult:
    step: int
    """The optimizer step just run, counted from 1."""
    loss: float
    """Mean token loss over the global batch (NaN when a non-finite loss stopped the step)."""
    lr: float
    active_layers: list[int]
    grad_norm: float
    """Global gradient norm before clipping, unscaled."""
    tokens: int
    """Non-padding tokens of the global batch."""
    step_time_s: float
    skipped: bool
    """No weight changed: a non-finite loss or gradient (or an fp16 overflow) was found first."""
    nonfinite_grad_shards: int
    backward_passes: int
    loss_scale: float | None
    """fp16: the dynamic loss scale after this step."""
    layer_update_ratio: list[float]
    """Per layer of `active_layers`: ||W_after - W_before|| / ||W_before|| over the layer's parameters."""
    active_blocks: list[str] | None = None
    """lisa.unit=block or expert: the trained units ("3.self_attn", "5.mlp"; "3.e5" an expert, "3" the rest of
    layer 3); `active_layers` are their layers."""
    aux_loss: float | None = None
    """Mixture-of-experts with the router's load-balancing loss on: its mean over the global batch's
    micro-batches, unweighted (the step's objective adds model.router_aux_loss_coef times it)."""
    expert_tokens: dict[str, list[int]] | None = None
    """Mixture-of-experts: per MoE layer (its index), the global batch's tokens routed to each expert (a token
    counts once for each of its top-k experts; padding does not count)."""

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl fields of this step."""
        out = {"step": self.step, "loss": self.loss, "lr": self.lr, "active_layers": self.active_layers,
               "grad_norm": self.grad_norm, "tokens": self.tokens, "tokens_per_s": self.tokens / self.step_time_s,
               "step_time_s": self.step_time_s, "skipped": self.skipped,
               "nonfinite_grad_shards": self.nonfinite_grad_shards, "backward_passes": self.backward_passes,
               "layer_update_ratio": self.layer_update_ratio}
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale
        if self.active_blocks is not None:
            out["active_blocks"] = self.active_blocks
        if self.aux_loss is not None:
            out["aux_loss"] = self.aux_loss
        if self.expert_tokens is not None:
            out["expert_tokens"] = self.expert_tokens
        return out


def _labelled_targets(batch: Batch, values: Values) -> float:
    """Tokens of a micro-batch the loss is taken on (labels shift by one)."""
    return values.item(_labelled(batch))


def _labelled(batch: Batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def _real_tokens(batch: Batch) -> torch.Tensor:
    mask, ids = batch.get("attention_mask"), batch["input_ids"]
    return mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)


def _per_router(names: list[str], sums: list[float]) -> dict[str, list[int]]:
    """The flattened routers x experts counts, per router's name."""
    width = len(sums) // max(len(names), 1)
    return {name: [round(c) for c in sums[i * width:(i + 1) * width]] for i, name in enumerate(names)}


class TrainingCore:
    """Reads its tensors through the engine's `Values` (`lisa-dist estimate` gives one whose tensors have
    shapes and no values); everything else runs as in training."""

    def __init__(self, config: Config, runtime: Runtime, engine: Engine,
                 last_checkpoint: Callable[[], Path | None] = lambda: None) -> None:
        assert engine.model is not None and engine.parts is not None, "build or adopt the model first"
        self.config = config
        self.runtime = runtime
        self.engine = engine
        self.model: nn.Module = engine.model
        self.parts = engine.parts
        self.values = engine.values
        self.last_checkpoint = last_checkpoint
        self.model.train()
        lisa = config.lisa
        self.units = sampling_units(self.parts, lisa.unit if config.method == "lisa" else "layer")
        self.frozen = tuple(router_modules(self.model)) if config.model.freeze_routers else ()
        self.unit_numel = [unit.numel() for unit in self.units]
        strategy = None
        if config.method == "lisa":
            with self.values.real_tensors():
                strategy = self.values.sampling(make_strategy(lisa, len(self.units), config.seed), self.units)
        # layer_weights is in the sampler's state already (as "weights")
        options = [key for key in strategy_options(lisa.strategy) if key != "layer_weights"] if strategy else []
        self.sampler = LayerSampler(len(self.units), lisa.interval, config.seed, strategy, unit=lisa.unit,
                                    config_key={key: getattr(lisa, key) for key in options})
        self.optimizer = ShardedOptimizer(make_rule(config.optim), engine, self.values,
                                          host=runtime.host_device if config.optim.offload_state else None)
        inactive_rule = make_inactive_rule(lisa, config.optim) if config.method == "lisa" else None
        self.inactive = None if inactive_rule is None else ShardedOptimizer(inactive_rule, engine, self.values)
        """lisa.inactive_update: updates the decoder units not sampled inside backward (None: they stay frozen)."""
        hooks = GradHooks(self.optimizer, dict(self.model.named_parameters()), engine.register_grad_hook,
                          engine.grad_units(), self.inactive)
        runner = FusedStep if self.optimizer.rule.fused else PostBackwardStep
        self.stepper = runner(config, runtime, engine, self.model, self.optimizer, hooks)
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}
        layer_ids = {id(p): i for i, layer in enumerate(self.parts.layers) for p in layer.parameters()}
        self.layer_of = {n: layer_ids[id(p)] for n, p in self.model.named_parameters() if id(p) in layer_ids}
        self.unit_of = self._slot_units()
        """By optimizer slot key (a parameter's name, or an expert's part of it), the unit it belongs to."""
        # experts' parts are slots of their own, not parameters
        self.layer_of |= {key: self.units[u].layer for key, u in self.unit_of.items() if key not in self.layer_of}
        self.active_layers: tuple[int, ...] | None = None
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def _slot_units(self) -> dict[str, int]:
        out = {}
        for u, unit in enumerate(self.units):
            for p in unit.parameters():
                name = self.param_names[id(p)]
                out[name if unit.expert is None else expert_key(name, unit.expert)] = u
        return out

    @classmethod
    def build(cls, config: Config, runtime: Runtime, source: ModelSource, mesh: DeviceMesh | None = None,
              values: Values = READ, **kwargs: Any) -> TrainingCore:
        """The model built by the engine from `source` (its weights, or random ones; none where `values` has
        no data)."""
        engine = create_engine(config, runtime, mesh=mesh, values=values)
        engine.build(source)
        return cls(config, runtime, engine, **kwargs)

    @classmethod
    def adopt(cls, config: Config, runtime: Runtime, model: nn.Module, **kwargs: Any) -> TrainingCore:
        """A model someone else built with real weights (a Hugging Face Trainer script's), sharded in place."""
        engine = create_engine(config, runtime)
        engine.adopt(model)
        return cls(config, runtime, engine, **kwargs)

    def set_active_layers(self, active: tuple[int, ...]) -> None:
        """Flip requires_grad so frozen units compute no weight gradients, then resize optimizer state."""
        lisa = self.config.lisa
        experts = set_trainable_units(self.parts, self.units, active, lisa.train_embeddings, lisa.train_norm,
                                      lisa.train_head, self.frozen)
        trained = trainable_named_parameters(self.model)
        self.optimizer.set_trainable(trained, {self.param_names[i]: chosen for i, chosen in experts.items()})
        if self.inactive is not None:  # every other decoder parameter, but frozen routers, trains inside backward
            for layer in self.parts.layers:
                layer.requires_grad_(True)
            for module in self.frozen:
                module.requires_grad_(False)
            self.inactive.set_trainable({name: p for name, p in trainable_named_parameters(self.model).items()
                                         if name not in trained})
        self.active_layers = active

    def switch(self, step: int, micro_batches: list[Batch] | None = None) -> None:
        """Before `step`: on the first step of an interval (or the first step run), the sampled units,
        checked identical on every rank, become the trainable ones. `lisa.strategy=outlier` measures its
        ratios on the first step's `micro_batches`."""
        if self.active_layers is not None and not self.sampler.is_switch(step):
            return
        strategy = self.sampler.strategy
        if strategy is not None and strategy.needs_calibration:
            measure = self.routing_scores if strategy.name == "routing" else self.outlier_ratios
            strategy.calibrate(measure(micro_batches))
        with self.values.real_tensors():
            active = self.sampler.active_layers(step)
        # The statistics too: ranks that drifted apart would draw apart at a later switch.
        verify_same_across_ranks(f"the active layers for step {step}",
                                 {"units": list(active), "statistics": strategy.state_dict() if strategy else {}})
        if active != self.active_layers:
            self.set_active_layers(active)

    def step(self, step: int, micro_batches: list[Batch], lr: float, loss_fn: LossFn | None = None) -> StepResult:
        """One optimizer step (counted from 0) over this rank's micro-batches of the global batch.

        `loss_fn` gives a micro-batch's summed token loss (`steps.LossFn`); by default lisa_dist's own
        (honouring train.loss_chunk_tokens). Call `raise_if_stalled` once the result is recorded."""
        start = time.perf_counter()
        self.model.train()
        self.switch(step, micro_batches)
        read = self.values
        device = self.runtime.device
        # Counted where the batch is, without a read; the global sums stay on the device for the loss scale, and
        # reach the host with the step's figures.
        local_counts = torch.stack([sum(_labelled(b) for b in micro_batches),
                                    sum(_real_tokens(b) for b in micro_batches)]).to(device, torch.float64,
                                                                                    non_blocking=True)
        global_targets = read.sum_over_ranks_on_device(local_counts)[0].clamp(min=1.0)
        loss_scale = self.stepper.scaler.scale
        outcome = self.stepper.run(step, micro_batches, global_targets, lr, loss_fn)
        self.sampler.step = step + 1
        layers = sorted({self.units[u].layer for u in self.active_layers})
        units = sorted(self.active_layers)
        load = self.stepper.expert_load
        expert_rows = load.take() if load is not None else None
        aux = outcome.aux_sum if outcome.aux_sum is not None else torch.zeros((), dtype=torch.float64, device=device)
        local = torch.cat([torch.stack([outcome.loss_sum.to(device, torch.float64), aux.to(device, torch.float64)]),
                           local_counts, self._layer_change_sums(layers), self._unit_grad_sums(units),
                           *([] if expert_rows is None else [expert_rows.flatten().to(device, torch.float64)]),
                           outcome.sums])
        # The step's one host sync: its figures travel in one reduction and reach the host in one read.
        total_loss, total_aux, total_targets, global_tokens, *sums = read.read_sum_over_ranks(local)
        self.stepper.settle(outcome, sums[-3:])
        self.skipped_steps += int(outcome.skipped)
        sums = sums[:-3]
        layer_sums, grad_sums = sums[:2 * len(layers)], sums[2 * len(layers):2 * len(layers) + len(units)]
        expert_sums = sums[2 * len(layers) + len(units):]
        if not outcome.skipped and self.sampler.strategy is not None:
            self.sampler.strategy.observe({u: sq / loss_scale ** 2 / self.unit_numel[u]
                                           for u, sq in zip(units, grad_sums)})
        result = StepResult(
            step=step + 1, loss=total_loss / max(total_targets, 1.0), lr=lr, active_layers=layers,
            grad_norm=outcome.grad_norm, tokens=int(global_tokens), step_time_s=time.perf_counter() - start,
            skipped=outcome.skipped, nonfinite_grad_shards=outcome.nonfinite_shards,
            backward_passes=outcome.backward_passes,
            loss_scale=self.stepper.scaler.scale if self.config.train.dtype == "fp16" else None,
            layer_update_ratio=[math.sqrt(change / value) if value > 0 else 0.0
                                for change, value in zip(layer_sums[0::2], layer_sums[1::2])],
            active_blocks=[self.units[u].name for u in units] if self.config.lisa.unit != "layer"
            and self.config.method == "lisa" else None,
            aux_loss=None if outcome.aux_sum is None else total_aux / (len(micro_batches) * self.runtime.world_size),
            expert_tokens=None if expert_rows is None else _per_router(load.names_counted(), expert_sums))
        nonfinite = outcome.skipped or outcome.nonfinite_shards > 0
        self.consecutive_skips = self.consecutive_skips + 1 if nonfinite else 0
        return result

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> tuple[float, float]:
        """This rank's (summed token loss, labelled tokens) over `micro_batches`, in eval mode and without
        gradients: no weight, optimizer state, layer choice or random state changes."""
        self.model.eval()
        loss_sum = targets = 0.0
        try:
            for batch in micro_batches:
                loss_sum += self.values.item(self.stepper.token_loss(batch))
                targets += _labelled_targets(batch, self.values)
        finally:
            self.engine.after_forward_only()
            self.model.train()
        return loss_sum, targets

    def _layer_change_sums(self, layers: list[int]) -> torch.Tensor:
        """This rank's (squared change, squared value) of each layer in `layers`, flattened, on the device, from
        the shards the step updated; reduced with the loss in one collective."""
        position = {layer: i for i, layer in enumerate(layers)}
        groups: list[list[torch.Tensor]] = [[] for _ in layers]
        for name, pair in self.optimizer.take_change_sums().items():
            layer = self.layer_of.get(name)
            if layer in position:
                groups[position[layer]].extend(pair)
        return self._group_sums(groups, 2)

    def _unit_grad_sums(self, units: list[int]) -> torch.Tensor:
        """This rank's squared gradient norm of each unit in `units` (loss-scaled, before clipping)."""
        position = {unit: i for i, unit in enumerate(units)}
        groups: list[list[torch.Tensor]] = [[] for _ in units]
        for name, sq in self.optimizer.take_grad_sums().items():
            unit = self.unit_of.get(name)
            if unit in position:
                groups[position[unit]].append(sq)
        return self._group_sums(groups, 1)

    def _group_sums(self, groups: list[list[torch.Tensor]], width: int) -> torch.Tensor:
        """Each group's 0-dim sums, taken `width` at a time and added in float64: one vector on the device, a few
        operations per group rather than per parameter."""
        device = self.runtime.device
        zeros = torch.zeros(width, dtype=torch.float64, device=device)
        rows = [torch.stack(group).to(device, torch.float64).view(-1, width).sum(0) if group else zeros
                for group in groups]
        return torch.cat(rows) if rows else zeros[:0]

    @torch.no_grad()
    def routing_scores(self, micro_batches: list[Batch] | None) -> list[float]:
        """Each unit's score for `lisa.strategy=routing` (`sampler.RoutingStrategy`), from the tokens the routers
        send each expert in forwards over every rank's `micro_batches` (the first step's), padding left out."""
        assert micro_batches, "the routing strategy measures on the first step's micro-batches"
        load = self.stepper.expert_load
        self.model.eval()
        try:
            load.reset()
            for batch in micro_batches:
                with load.counting(batch.get("attention_mask")):
                    self.stepper.token_loss(batch)
        finally:
            self.engine.after_forward_only()
            self.model.train()
        names = load.names_counted()
        rows = load.take()
        counts = sum_over_ranks(rows.flatten(), self.runtime.device).view(rows.shape).cpu()
        by_layer = {name: row for name, row in zip(names, counts)}
        scores = []
        for unit in self.units:
            row = by_layer.get(str(unit.layer))
            if unit.expert is None or row is None or float(row.sum()) <= 0:
                scores.append(1.0)
            else:
                scores.append(float(row[unit.expert] / row.sum()) * row.numel())
        return scores

    @torch.no_grad()
    def outlier_ratios(self, micro_batches: list[Batch] | None) -> list[float]:
        """Each unit's OWL outlier ratio, from forwards over this rank's `micro_batches` (the first step's)
        and the shards of every rank."""
        assert micro_batches, "the outlier strategy measures on the first step's micro-batches"
        modules = [linear_modules(unit.module) for unit in self.units]
        norms = InputNorms([m for ms in modules for m in ms], self.runtime.device)
        self.model.eval()
        try:
            with norms.record():
                for batch in micro_batches:
                    norms.mask = batch.get("attention_mask")
                    self.stepper.token_loss(batch)
        finally:
            self.engine.after_forward_only()
            self.model.train()
        norms.load_flat(sum_over_ranks(norms.flat(), self.runtime.device))
        return outlier_ratios(modules, self.engine, norms, self.config.lisa.outlier_threshold,
                              lambda t: sum_over_ranks(t, self.runtime.device).cpu())

    def raise_if_stalled(self, step: int) -> None:
        """After `step` was recorded: stop once `train.max_consecutive_skips` steps in a row met a
        non-finite loss or gradient."""
        limit = self.config.train.max_consecutive_skips
        if not limit or self.consecutive_skips < limit:
            return
        last = self.last_checkpoint()
        kept = f"the last checkpoint, {last}, is intact" if last else "no step checkpoint had been written"
        raise NonFiniteStepsError(
            f"steps {step + 2 - self.consecutive_skips} to {step + 1}: {self.consecutive_skips} steps in a row "
            f"met a non-finite loss or gradient (train.max_consecutive_skips={limit}); their non-finite values "
            f"changed no weight and {kept}. Lower optim.lr, check the data, or train in bf16/fp32 rather than fp16")

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides the model and optimizer shards (torch's `Stateful` protocol)."""
        return {"sampler": self.sampler.state_dict(), "loss_scaler": self.stepper.scaler.state_dict(),
                "last_grad_norm": self.stepper.last_grad_norm, "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The sampler's position first: the layers of the last step run are made trainable, so optimizer
        state is allocated for exactly the shards the checkpoint holds. A checkpoint written at the end of
        an interval switches at the next step, as the uninterrupted run does."""
        with self.values.real_tensors():
            self.sampler.load_state_dict(state["sampler"])
            active = self.sampler.active_layers(max(self.sampler.step - 1, 0))
        self.set_active_layers(active)
        self.stepper.scaler.load_state_dict(state["loss_scaler"])
        self.stepper.last_grad_norm = state["last_grad_norm"]
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))

    @property
    def optimizers(self) -> list[ShardedOptimizer]:
        """The sampled units' optimizer, and lisa.inactive_update's for the others."""
        return [self.optimizer] if self.inactive is None else [self.optimizer, self.inactive]

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every optimizer's local state by slot key (the two optimizers' parameters are disjoint)."""
        return {key: state for optimizer in self.optimizers for key, state in optimizer.state_dict().items()}

    def memory_tensors(self) -> list[torch.Tensor]:
        """Long-lived tensors of this rank (shards, gradients kept, optimizer state), for CPU accounting."""
        return [*self.engine.resident_tensors(), *(t for s in self.optimizer_state().values() for t in s.values())]
