"""One optimizer step: forward/backward over the micro-batches, then the update after backward
(adamw, sgd) or inside it (lomo, adalomo), with clipping, loss scaling and non-finite handling."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from lisa_dist.config import Config
from lisa_dist.distributed import Runtime
from lisa_dist.engines.base import Engine
from lisa_dist.loss import loss_sum_and_router_aux
from lisa_dist.models.moe import ExpertLoad, RouterAux, router_aux
from lisa_dist.offload import offload_saved_tensors
from lisa_dist.optim import ShardedOptimizer
from lisa_dist.optim.fused import GradHooks
from lisa_dist.optim.precision import DynamicLossScaler, rounding_generator
from lisa_dist.optim.sharded_optimizer import UpdateOptions

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch, torch.Tensor], torch.Tensor]
"""`loss_fn(micro_batch, global_targets)`: the micro-batch's summed token loss, a scalar tensor to
backpropagate (`global_targets`, the labelled tokens of the whole global batch as a 0-dim tensor on the device,
is for losses that normalize themselves, such as a Trainer's `compute_loss`)."""


@dataclass(slots=True)
class StepOutcome:
    loss_sum: torch.Tensor
    """Sum of token losses on this rank, on the device (NaN when a non-finite loss stopped the step)."""
    grad_norm: float
    """Global gradient norm before clipping, unscaled."""
    skipped: bool
    """No weight changed: a non-finite loss or gradient (or an fp16 overflow) was found first."""
    nonfinite_shards: int = 0
    """One-pass fused mode: gradient shards that were non-finite and therefore not applied."""
    backward_passes: int = 1
    norm_sums: torch.Tensor | None = None
    """This rank's squared gradient norm and non-finite shard count, on the device, when no decision of the step
    waited for their reduction: they go with the step's figures, and `StepRunner.settle` fills in `grad_norm`
    and `nonfinite_shards` from the sums."""
    aux_sum: torch.Tensor | None = None
    """Mixture-of-experts: the sum of this rank's micro-batches' router load-balancing losses (unweighted), on
    the device, where lisa_dist added them to its own loss (None: not added)."""


class StepRunner:
    def __init__(self, config: Config, runtime: Runtime, engine: Engine, model: nn.Module,
                 optimizer: ShardedOptimizer, hooks: GradHooks) -> None:
        self.hooks = hooks
        self.values = engine.values
        self.last_grad_norm: float | None = None
        """The previous step's norm, by which a one-pass fused step clips."""
        self.config = config
        self.runtime = runtime
        self.engine = engine
        self.model = model
        self.optimizer = optimizer
        self.router_aux = router_aux(config, model)
        """The router load-balancing loss added to the token loss (None: off, or not an MoE model)."""
        self.expert_load = ExpertLoad.of(engine.parts.layers, model.config, runtime.device)
        """Mixture-of-experts: tokens routed to each expert in the last pass's forwards (None: a dense model)."""
        self.expert_load_hooks = self.expert_load.register() if self.expert_load is not None else []
        t = config.train
        self.scaler = DynamicLossScaler(t.loss_scale, t.loss_scale_window, t.min_loss_scale, t.dtype == "fp16")

    def _options(self, step: int, lr: float, clip: float) -> UpdateOptions:
        generator = None
        if self.config.optim.stochastic_rounding:
            generator = rounding_generator(self.config.seed, step, self.runtime.rank, self.runtime.device)
        return UpdateOptions(lr=lr, grad_scale=clip / self.scaler.scale, clip_value=self.config.optim.clip_grad_value,
                             generator=generator)

    def _clip_factor(self, grad_norm: float | None) -> float:
        max_norm = self.config.optim.max_grad_norm
        if max_norm <= 0 or grad_norm is None or not math.isfinite(grad_norm):
            return 1.0
        return min(1.0, max_norm / (grad_norm + 1e-6))

    def token_loss(self, batch: Batch) -> torch.Tensor:
        """A micro-batch's summed token loss, lisa_dist's own, without the router's."""
        return self._loss_and_aux(batch, None)[0]

    def _loss_and_aux(self, batch: Batch, aux: RouterAux | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return loss_sum_and_router_aux(self.model, self.engine.parts.head, batch, self.config.train.loss_chunk_tokens,
                                       self.runtime.device, aux)

    def forward_backward(self, micro_batches: list[Batch], global_targets: torch.Tensor, check_loss: bool,
                         loss_fn: LossFn | None = None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Returns (local loss sum, local router load-balancing loss sum or None where none was added, whether
        every micro-batch's loss was finite on every rank); the sums stay on the device. The router's loss
        (lisa_dist's own loss only; a Trainer's includes its own) is the mean over the global batch's
        micro-batches, weighted by its coefficient. With `check_loss`, each micro-batch's loss is checked
        finite on every rank before its backward: one reduction and host read per micro-batch."""
        scale = self.runtime.world_size / global_targets * self.scaler.scale
        adds_aux = self.router_aux is not None and loss_fn is None
        aux_weight = self.router_aux.coef * global_targets / (len(micro_batches) * self.runtime.world_size) \
            if adds_aux else 0.0
        device = self.runtime.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        aux_total = torch.zeros((), dtype=torch.float64, device=device)
        if self.expert_load is not None:
            self.expert_load.reset()  # a precheck's two passes route the same tokens alike: count one
        for i, batch in enumerate(micro_batches):
            with offload_saved_tensors(self.runtime.host_device, self.config.model.activation_offload,
                                       self.engine.saves_parameters_by_reference), self._counting_experts(batch):
                if loss_fn is None:
                    loss_sum, aux = self._loss_and_aux(batch, self.router_aux)
                else:
                    loss_sum, aux = loss_fn(batch, global_targets), None
            value = loss_sum.detach().to(device, torch.float64)
            aux_value = torch.zeros_like(value) if aux is None else aux.detach().to(device, torch.float64)
            if check_loss:
                (bad,) = self.values.read_sum_over_ranks((~torch.isfinite(value + aux_value)).double().reshape(1))
                if bad:
                    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
                    return nan, nan if adds_aux else None, False
            self.hooks.final_micro_batch = i == len(micro_batches) - 1
            # Reduce-scatter averages over ranks; scaling by world size gives the per-token mean over the
            # whole global batch, whatever the world size and micro-batch split.
            objective = loss_sum if aux is None else loss_sum + aux * aux_weight
            self.engine.backward(objective * scale)
            total = total + value
            aux_total = aux_total + aux_value
        return total, aux_total if adds_aux else None, True

    def _counting_experts(self, batch: Batch) -> AbstractContextManager[None]:
        return self.expert_load.counting(batch.get("attention_mask")) if self.expert_load is not None \
            else nullcontext()

    def settle(self, outcome: StepOutcome, total_sq: float, total_bad: float) -> None:
        """An outcome's pending norm (`StepOutcome.norm_sums`), summed over ranks: its norm and non-finite count,
        and the norm the next step clips by."""
        outcome.grad_norm, outcome.nonfinite_shards = self._norm(total_sq, total_bad)
        if math.isfinite(outcome.grad_norm):
            self.last_grad_norm = outcome.grad_norm

    def _norm_sums(self, sq: torch.Tensor, bad: torch.Tensor | int = 0) -> torch.Tensor:
        """This rank's squared gradient norm and non-finite shard count, one float64 vector on the device."""
        device = self.runtime.device
        return torch.stack([torch.as_tensor(sq).to(device, torch.float64).reshape(()),
                            torch.as_tensor(bad).to(device, torch.float64).reshape(())])

    def _norm(self, total_sq: float, total_bad: float) -> tuple[float, int]:
        """The global gradient norm (unscaled) and count of non-finite shards, from their sums over ranks."""
        return math.sqrt(total_sq) / self.scaler.scale, int(total_bad)

    def _global(self, sq: torch.Tensor, bad: torch.Tensor | int = 0) -> tuple[float, int]:
        """The global gradient norm and count of non-finite shards: one reduction, one host read."""
        return self._norm(*self.values.read_sum_over_ranks(self._norm_sums(sq, bad)))


class PostBackwardStep(StepRunner):
    def run(self, step: int, micro_batches: list[Batch], global_targets: torch.Tensor, lr: float,
            loss_fn: LossFn | None = None) -> StepOutcome:
        self.hooks.begin_pass("accumulate", UpdateOptions(lr=lr), guard=False)
        loss_sum, aux_sum, _ = self.forward_backward(micro_batches, global_targets, check_loss=False, loss_fn=loss_fn)
        grad_norm, _ = self._global(self.optimizer.grad_sq_sum())
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step(self._options(step, lr, self._clip_factor(grad_norm)))
        self.optimizer.zero_grad(self.model)
        self.scaler.update(overflow=skipped)
        return StepOutcome(loss_sum=loss_sum, grad_norm=grad_norm, skipped=skipped, aux_sum=aux_sum)


class FusedStep(StepRunner):
    """lomo/adalomo. Without precheck: one backward; clipping by global norm uses the previous step's
    norm; a non-finite loss skips the step before backward; a non-finite gradient shard is not applied.
    With precheck: a first backward measures (non-finite check, exact norm) and discards every gradient;
    only if all is finite does a second backward apply the updates, so a bad step changes no weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        precheck = self.config.optim.fused_precheck
        self.precheck = self.config.train.dtype == "fp16" if precheck is None else precheck

    def _pass(self, mode: str, options: UpdateOptions, guard: bool, micro_batches: list[Batch],
              global_targets: torch.Tensor, loss_fn: LossFn | None, read_norm: bool) -> StepOutcome:
        """One forward/backward with the hooks in `mode`; `skipped` means a non-finite loss stopped it. The
        gradient norm is read here with `read_norm`, else left pending (`StepOutcome.norm_sums`)."""
        self.hooks.begin_pass(mode, options, guard)
        loss_sum, aux_sum, finite = self.forward_backward(micro_batches, global_targets, check_loss=True,
                                                          loss_fn=loss_fn)
        if not finite:
            self.optimizer.zero_grad(self.model)
            return StepOutcome(loss_sum=loss_sum, grad_norm=math.nan, skipped=True, aux_sum=aux_sum)
        sq, bad = self.hooks.end_pass(self.model)
        if not read_norm:
            return StepOutcome(loss_sum=loss_sum, grad_norm=math.nan, skipped=False, norm_sums=self._norm_sums(sq, bad),
                               aux_sum=aux_sum)
        grad_norm, nonfinite = self._global(sq, bad)
        return StepOutcome(loss_sum=loss_sum, grad_norm=grad_norm, skipped=False, nonfinite_shards=nonfinite,
                           aux_sum=aux_sum)

    def run(self, step: int, micro_batches: list[Batch], global_targets: torch.Tensor, lr: float,
            loss_fn: LossFn | None = None) -> StepOutcome:
        if self.precheck:
            check = self._pass("check", UpdateOptions(lr=lr), False, micro_batches, global_targets, loss_fn,
                               read_norm=True)
            if check.skipped or check.nonfinite_shards or not math.isfinite(check.grad_norm):
                self.scaler.update(overflow=True)
                return StepOutcome(loss_sum=check.loss_sum, grad_norm=check.grad_norm, skipped=True,
                                   backward_passes=1, aux_sum=check.aux_sum)
            options = self._options(step, lr, self._clip_factor(check.grad_norm))
            self._pass("apply", options, False, micro_batches, global_targets, loss_fn, read_norm=False)
            self.scaler.update(overflow=False)
            return StepOutcome(loss_sum=check.loss_sum, grad_norm=check.grad_norm, skipped=False, backward_passes=2,
                               aux_sum=check.aux_sum)
        # Clipped by the previous step's norm: this step's is read with its figures (`settle`).
        options = self._options(step, lr, self._clip_factor(self.last_grad_norm))
        return self._pass("apply", options, True, micro_batches, global_targets, loss_fn, read_norm=False)
