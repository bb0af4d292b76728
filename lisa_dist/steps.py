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
from lisa_dist.optim.rules import inactive_lr
from lisa_dist.optim.sharded_optimizer import UpdateOptions
from lisa_dist.randomness import model_randomness

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch, torch.Tensor], torch.Tensor]
"""`loss_fn(micro_batch, global_targets)`: the micro-batch's summed token loss, a scalar tensor to
backpropagate (`global_targets`, the labelled tokens of the whole global batch as a 0-dim tensor on the device,
is for losses that normalize themselves, such as a Trainer's `compute_loss`)."""


@dataclass(slots=True)
class StepOutcome:
    loss_sum: torch.Tensor
    """Sum of token losses on this rank, on the device (NaN where a micro-batch's loss was non-finite)."""
    sums: torch.Tensor
    """This rank's squared gradient norm (as measured, loss-scaled), count of non-finite gradient shards and
    whether the step's updates were held back (`StepRunner._sums`), on the device: they travel with the step's
    figures, and `StepRunner.settle` fills in the fields below from their sums over ranks."""
    grad_norm: float = math.nan
    """Global gradient norm before clipping, unscaled."""
    skipped: bool = False
    """No weight changed: a non-finite loss or gradient (or an fp16 overflow) was found first."""
    nonfinite_shards: int = 0
    """One-pass fused mode: gradient shards that were non-finite and therefore not applied."""
    backward_passes: int = 1
    aux_sum: torch.Tensor | None = None
    """Mixture-of-experts: the sum of this rank's micro-batches' router load-balancing losses (unweighted), on
    the device, where lisa_dist added them to its own loss (None: not added)."""


class StepRunner:
    """Every decision of a step (clip, skip, hold back an update) is taken on the device, from sums reduced
    there; the host learns the outcome from the step's one read (`settle`)."""

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

    def _options(self, step: int, lr: float, clip: float | torch.Tensor,
                 commit: torch.Tensor | None) -> UpdateOptions:
        generator = None
        if self.config.optim.stochastic_rounding:
            generator = rounding_generator(self.config.seed, step, self.runtime.rank, self.runtime.device)
        return UpdateOptions(lr=lr, grad_scale=clip / self.scaler.scale, clip_value=self.config.optim.clip_grad_value,
                             generator=generator, commit=commit)

    def _clip_factor(self, grad_norm: float | None) -> float:
        max_norm = self.config.optim.max_grad_norm
        if max_norm <= 0 or grad_norm is None or not math.isfinite(grad_norm):
            return 1.0
        return min(1.0, max_norm / (grad_norm + 1e-6))

    def _clip_factor_on_device(self, total_sq: torch.Tensor) -> float | torch.Tensor:
        """`_clip_factor` of the norm whose squared sum over ranks is `total_sq`, computed on the device in
        float64 as the host would (1 where the norm is not finite)."""
        if self.config.optim.max_grad_norm <= 0:
            return 1.0
        norm = total_sq.sqrt() / self.scaler.scale
        clip = (self.config.optim.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return torch.where(torch.isfinite(norm), clip, 1.0).float()  # the float32 factor a Python float would be

    def token_loss(self, batch: Batch) -> torch.Tensor:
        """A micro-batch's summed token loss, lisa_dist's own, without the router's."""
        return self._loss_and_aux(batch, None)[0]

    def _loss_and_aux(self, batch: Batch, aux: RouterAux | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return loss_sum_and_router_aux(self.model, self.engine.parts.head, batch, self.config.train.loss_chunk_tokens,
                                       self.runtime.device, aux)

    def forward_backward(self, step: int, micro_batches: list[Batch], global_targets: torch.Tensor,
                         check_loss: bool, loss_fn: LossFn | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_forward_backward`, with the model's own draws (dropout) a function of the seed, `step` and the rank
        (`randomness.model_randomness`): repeatable, the same after a resume, alike in both passes of a step."""
        with model_randomness(self.config.seed, step, self.runtime.rank, self.runtime.device):
            return self._forward_backward(micro_batches, global_targets, check_loss, loss_fn)

    def _forward_backward(self, micro_batches: list[Batch], global_targets: torch.Tensor, check_loss: bool,
                          loss_fn: LossFn | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (local loss sum, local router load-balancing loss sum or None where none was added); both
        stay on the device. The router's loss (lisa_dist's own loss only; a Trainer's includes its own) is the
        mean over the global batch's micro-batches, weighted by its coefficient. With `check_loss`, before the
        last micro-batch's backward (where fused updates run) the pass's updates are made to stand only if
        every rank's losses were finite (`UpdateOptions.commit`): one reduction on the device, no host read."""
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
            total = total + loss_sum.detach().to(device, torch.float64)
            if aux is not None:
                aux_total = aux_total + aux.detach().to(device, torch.float64)
            self.hooks.final_micro_batch = i == len(micro_batches) - 1
            if check_loss and self.hooks.final_micro_batch:
                self._commit_if_finite(total + aux_total)
            # Reduce-scatter averages over ranks; scaling by world size gives the per-token mean over the
            # whole global batch, whatever the world size and micro-batch split.
            objective = loss_sum if aux is None else loss_sum + aux * aux_weight
            self.engine.backward(objective * scale)
        return total, aux_total if adds_aux else None

    def _commit_if_finite(self, local_losses: torch.Tensor) -> None:
        """The pass's updates stand only if every rank's summed losses are finite (and its commit said so)."""
        bad = self.values.sum_over_ranks_on_device((~torch.isfinite(local_losses)).double().reshape(1))[0]
        commit = self.hooks.options.commit
        self.hooks.options.commit = bad == 0 if commit is None else commit & (bad == 0)

    def _counting_experts(self, batch: Batch) -> AbstractContextManager[None]:
        return self.expert_load.counting(batch.get("attention_mask")) if self.expert_load is not None \
            else nullcontext()

    def _sums(self, sq: torch.Tensor, bad: torch.Tensor | int, commit: torch.Tensor | None) -> torch.Tensor:
        """This rank's squared gradient norm, non-finite shard count and whether its updates were held back,
        one float64 vector on the device."""
        device = self.runtime.device
        held = torch.zeros((), device=device) if commit is None else ~commit
        return torch.stack([torch.as_tensor(t).to(device, torch.float64).reshape(()) for t in (sq, bad, held)])

    def settle(self, outcome: StepOutcome, totals: list[float]) -> None:
        """An outcome from its sums over ranks (`StepOutcome.sums`, read with the step's figures): its norm,
        non-finite count and whether it was skipped; updates held back are not counted, the fp16 loss scale
        moves, and a finite norm is the one the next one-pass fused step clips by."""
        total_sq, total_bad, total_held = totals
        outcome.grad_norm = math.sqrt(total_sq) / self.scaler.scale
        outcome.nonfinite_shards = int(total_bad)
        outcome.skipped = total_held > 0
        self.optimizer.settle(committed=not outcome.skipped)
        self.scaler.update(overflow=outcome.skipped)
        if math.isfinite(outcome.grad_norm):
            self.last_grad_norm = outcome.grad_norm


class PostBackwardStep(StepRunner):
    """adamw, sgd: the update after backward, clipped by the step's global norm; a non-finite norm skips it.
    With lisa.inactive_update the units not sampled are updated inside backward, as LOMO's one pass is: by
    the previous step's norm, a non-finite gradient shard not applied; their gradients count in the norm."""

    def run(self, step: int, micro_batches: list[Batch], global_targets: torch.Tensor, lr: float,
            loss_fn: LossFn | None = None) -> StepOutcome:
        inactive = self._inactive_options(step, lr) if self.hooks.inactive is not None else None
        self.hooks.begin_pass("accumulate", UpdateOptions(lr=lr), guard=False, inactive_options=inactive)
        loss_sum, aux_sum = self.forward_backward(step, micro_batches, global_targets, check_loss=False,
                                                  loss_fn=loss_fn)
        inactive_sq, bad = self.hooks.end_pass(self.model)
        sq = self.optimizer.grad_sq_sum()
        sq = sq + inactive_sq.to(sq.device)
        total_sq = self.values.sum_over_ranks_on_device(sq.to(self.runtime.device, torch.float64).reshape(1))[0]
        commit = torch.isfinite(total_sq)  # a non-finite norm (or an fp16 overflow) skips the step
        self.optimizer.step(self._options(step, lr, self._clip_factor_on_device(total_sq), commit))
        self.optimizer.zero_grad(self.model)
        return StepOutcome(loss_sum=loss_sum, sums=self._sums(sq, bad, commit), aux_sum=aux_sum)

    def _inactive_options(self, step: int, lr: float) -> UpdateOptions:
        """lisa.inactive_lr on optim.lr's schedule; in bf16 always rounded stochastically (no fp32 master keeps
        what rounds away), from a stream of its own."""
        config = self.config
        generator = None
        if config.train.dtype == "bf16" or config.optim.stochastic_rounding:
            generator = rounding_generator(config.seed, step, self.runtime.rank, self.runtime.device, "inactive")
        return UpdateOptions(lr=inactive_lr(config.lisa, config.optim) * lr / config.optim.lr,
                             grad_scale=self._clip_factor(self.last_grad_norm) / self.scaler.scale,
                             clip_value=config.optim.clip_grad_value, generator=generator)


class FusedStep(StepRunner):
    """lomo/adalomo. Without precheck: one backward; clipping by global norm uses the previous step's
    norm; a non-finite loss on any rank holds back every update; a non-finite gradient shard is not applied.
    With precheck: a first backward measures (non-finite check, exact norm) and discards every gradient; a
    second applies the updates, which stand only if all was finite, so a bad step changes no weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        precheck = self.config.optim.fused_precheck
        self.precheck = self.config.train.dtype == "fp16" if precheck is None else precheck

    def _pass(self, step: int, mode: str, options: UpdateOptions, guard: bool, micro_batches: list[Batch],
              global_targets: torch.Tensor, loss_fn: LossFn | None) -> tuple[StepOutcome, torch.Tensor, torch.Tensor]:
        """One forward/backward with the hooks in `mode`; returns its outcome and its local (squared gradient
        norm, non-finite shard count)."""
        self.hooks.begin_pass(mode, options, guard)
        loss_sum, aux_sum = self.forward_backward(step, micro_batches, global_targets, check_loss=True,
                                                  loss_fn=loss_fn)
        sq, bad = self.hooks.end_pass(self.model)
        outcome = StepOutcome(loss_sum=loss_sum, sums=self._sums(sq, bad, self.hooks.options.commit), aux_sum=aux_sum)
        return outcome, sq, bad

    def run(self, step: int, micro_batches: list[Batch], global_targets: torch.Tensor, lr: float,
            loss_fn: LossFn | None = None) -> StepOutcome:
        if not self.precheck:  # clipped by the previous step's norm: this step's is read with its figures
            options = self._options(step, lr, self._clip_factor(self.last_grad_norm), None)
            return self._pass(step, "apply", options, True, micro_batches, global_targets, loss_fn)[0]
        check, sq, bad = self._pass(step, "check", UpdateOptions(lr=lr), False, micro_batches, global_targets,
                                    loss_fn)
        # The norm and non-finite count go over ranks on the device: the apply pass clips by them and its
        # updates stand only if the check found every loss and gradient finite.
        totals = self.values.sum_over_ranks_on_device(check.sums)
        commit = (totals[1] == 0) & (totals[2] == 0) & torch.isfinite(totals[0])
        options = self._options(step, lr, self._clip_factor_on_device(totals[0]), commit)
        self._pass(step, "apply", options, False, micro_batches, global_targets, loss_fn)
        check.sums = self._sums(sq, bad, self.hooks.options.commit)
        check.backward_passes = 2
        return check
