"""Element-wise update rules on one fp32 shard; they never see the full tensor or the engine."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from lisa_dist.config import LisaConfig, OptimConfig
from lisa_dist.errors import ConfigError
from lisa_dist.optim.shard_info import ShardInfo, matrix_segments, outer_slice, per_matrix, row_col_sums


def squared_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of t's squared elements in fp32, without a temporary of t's size (`t.pow(2).sum()` makes
    one). A norm's reduction keeps fp32 accuracy over tens of millions of elements; `torch.dot` on CPU lost
    three digits at 64 M."""
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


class UpdateRule(Protocol):
    fused: bool
    """Applied inside backward as each gradient shard is ready (LOMO family) rather than after it."""
    needs_finite_grads: bool
    """The rule's state, or its statistics across ranks, take each gradient in: the non-finite guard gives
    it zeros for a bad shard. A stateless rule only needs the shard's value restored afterwards."""
    keeps_master_when_held: bool
    """Under a False `commit` the rule leaves `master` as it was itself, so the optimizer need not put it back."""

    def init_state(self, master: torch.Tensor, shard: ShardInfo) -> dict[str, torch.Tensor]: ...

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float, shard: ShardInfo, commit: torch.Tensor | None = None) -> None:
        """Update `master` (fp32, this rank's shard) in place. Rules that reduce across ranks must do so
        on every rank, also for empty shards, in the same order. With `commit` (a 0-dim bool on the device)
        False, `state` must end as it was, bit for bit, without a host read; `grad` is then zeros and `master`
        may change (the optimizer puts it back)."""

    def update_many(self, masters: list[torch.Tensor], grads: list[torch.Tensor],
                    states: list[dict[str, torch.Tensor]], steps: list[int], lr: float,
                    shards: list[ShardInfo], commit: torch.Tensor | None = None) -> None:
        """`update` of each (master, grad, state, step, shard), with torch's multi-tensor kernels where the
        rule has them; the same numbers as one `update` after another."""


class OneAtATime:
    """`update_many` as a loop over `update`, for rules without a multi-tensor form."""

    def update_many(self, masters: list[torch.Tensor], grads: list[torch.Tensor],
                    states: list[dict[str, torch.Tensor]], steps: list[int], lr: float,
                    shards: list[ShardInfo], commit: torch.Tensor | None = None) -> None:
        for master, grad, state, step, shard in zip(masters, grads, states, steps, shards):
            self.update(master, grad, state, step, lr, shard, commit)


class AdamW:
    """Decoupled weight decay Adam, the same arithmetic as `torch.optim.AdamW` (amsgrad off)."""

    fused = False
    needs_finite_grads = True
    keeps_master_when_held = True

    def __init__(self, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay

    def init_state(self, master: torch.Tensor, shard: ShardInfo) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float, shard: ShardInfo, commit: torch.Tensor | None = None) -> None:
        self.update_many([master], [grad], [state], [step], lr, [shard], commit)

    def update_many(self, masters: list[torch.Tensor], grads: list[torch.Tensor],
                    states: list[dict[str, torch.Tensor]], steps: list[int], lr: float,
                    shards: list[ShardInfo], commit: torch.Tensor | None = None) -> None:
        """torch's multi-tensor AdamW (`torch.optim.AdamW(foreach=True)`, one kernel per operation for all
        the shards on a GPU), with a step count per shard: LISA's layers enter at different steps.

        Under `commit` the factors are device tensors that become neutral when it is False: the moments' decays
        1 and 0 (zero gradients then leave them as they were), the weight decay 1, and eps infinite (the step
        m / (sqrt(v) + eps) is then 0). They are the same float32 factors as the scalars, so a standing update's
        numbers do not change, and no pass puts anything back."""
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        decay, beta1, beta2, eps = 1 - lr * self.weight_decay, 1 - self.beta1, self.beta2, self.eps
        if commit is not None:  # in lists of 0-dim tensors where a single one would be read to the host
            many = len(masters)
            decay = torch.where(commit, decay, 1.0)
            beta1, beta2 = [torch.where(commit, beta1, 0.0)] * many, torch.where(commit, beta2, 1.0)
            eps = [torch.where(commit, eps, math.inf)] * many
        if self.weight_decay:
            torch._foreach_mul_(masters, decay)
        torch._foreach_lerp_(exp_avgs, grads, beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - self.beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [math.sqrt(1 - self.beta2 ** step) for step in steps])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(masters, exp_avgs, denoms, [-lr / (1 - self.beta1 ** step) for step in steps])


class Sgd(OneAtATime):
    """SGD with optional momentum (no dampening) and L2 weight decay, as `torch.optim.SGD`.

    Fused without momentum it is LOMO (arXiv 2306.09782): no state at all.
    """

    keeps_master_when_held = False

    def __init__(self, momentum: float, weight_decay: float, fused: bool = False) -> None:
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.fused = fused
        self.needs_finite_grads = bool(momentum)

    def init_state(self, master: torch.Tensor, shard: ShardInfo) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(master)} if self.momentum else {}

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float, shard: ShardInfo, commit: torch.Tensor | None = None) -> None:
        if self.weight_decay:
            grad = grad.add(master, alpha=self.weight_decay)
            if commit is not None and self.momentum:
                grad.masked_fill_(~commit, 0.0)
        if self.momentum:
            buf = state["momentum_buffer"]
            if step == 1:  # a fresh buffer is zeros, as a held-back first update leaves it
                buf.copy_(grad)
            else:
                buf.mul_(self.momentum if commit is None else torch.where(commit, self.momentum, 1.0)).add_(grad)
            grad = buf
        master.add_(grad, alpha=-lr)


class SignSgd(OneAtATime):
    """signSGD: each element moves by lr against its gradient's sign (a zero gradient: not at all). No state;
    applied inside backward (FRUGAL's state-free rule, arXiv 2411.07837)."""

    fused = True
    needs_finite_grads = False
    keeps_master_when_held = False

    def init_state(self, master: torch.Tensor, shard: ShardInfo) -> dict[str, torch.Tensor]:
        return {}

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float, shard: ShardInfo, commit: torch.Tensor | None = None) -> None:
        master.sub_(grad.sign_(), alpha=lr)


class AdaLomo:
    """AdaLomo (arXiv 2310.10195): factored second moment, grouped update normalization, relative step.

    Per matrix: exponential averages of the row and column means of g^2 + eps1 (decay 1 - t^decay_rate),
    update g / sqrt(v) with v the rank-1 estimate from them, its RMS capped at `clip_threshold`, then a
    step of lr * max(eps2, RMS(parameter)). On a shard the row/column sums of this slice are reduced across
    ranks (vectors of rows + cols floats), as are the two scalars RMS(update) and RMS(parameter). A
    mixture-of-experts layer's [experts, rows, cols] parameter is a stack of matrices, each expert its own
    (as AdaLomo treats the per-expert weights of the checkpoint layout): statistics, RMS(update) and
    RMS(parameter) per expert, never across experts.
    """

    fused = True
    needs_finite_grads = True
    keeps_master_when_held = False

    def __init__(self, eps: tuple[float, float], decay_rate: float, clip_threshold: float, weight_decay: float) -> None:
        self.eps1, self.eps2 = eps
        self.decay_rate = decay_rate
        self.clip_threshold = clip_threshold
        self.weight_decay = weight_decay

    def init_state(self, master: torch.Tensor, shard: ShardInfo) -> dict[str, torch.Tensor]:
        if shard.matrix is None:
            return {"exp_avg_sq": torch.zeros_like(master)}
        matrices, rows, cols = shard.matrix
        return {"exp_avg_sq_row": master.new_zeros(matrices * rows),
                "exp_avg_sq_col": master.new_zeros(matrices * cols)}

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float, shard: ShardInfo, commit: torch.Tensor | None = None) -> None:
        self.update_many([master], [grad], [state], [step], lr, [shard], commit)

    def update_many(self, masters: list[torch.Tensor], grads: list[torch.Tensor],
                    states: list[dict[str, torch.Tensor]], steps: list[int], lr: float,
                    shards: list[ShardInfo], commit: torch.Tensor | None = None) -> None:
        """Under `commit`, the statistics (row and column vectors; a shard of a vector) are put back from
        copies when it is False: small beside the shard, and the arithmetic stays that of `update`."""
        kept = None if commit is None else [{key: t.clone() for key, t in state.items()} for state in states]
        self._update_many(masters, grads, states, steps, lr, shards)
        for state, before in zip(states, kept or []):
            for key, t in state.items():
                torch.where(commit, t, before[key], out=t)

    def _update_many(self, masters: list[torch.Tensor], grads: list[torch.Tensor],
                     states: list[dict[str, torch.Tensor]], steps: list[int], lr: float,
                     shards: list[ShardInfo]) -> None:
        """The shards' statistics go across ranks in two collectives for all of them (`_sum_over_ranks`):
        first the row and column means and the parameters' squared sums (with vectors' update sums), then
        the matrices' update sums. Each update is made in its gradient's storage (the gradient is consumed),
        so the temporaries stay one shard's at a time. Per shard, the arithmetic of `update` alone."""
        beta2ts = [1.0 - step ** self.decay_rate for step in steps]
        stats = []
        for master, grad, state, beta2t, shard in zip(masters, grads, states, beta2ts, shards):
            sq = grad.pow(2).add_(self.eps1)
            param_sq = _per_matrix_squared_sums(master, shard)
            if shard.matrix is None:
                avg = state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
                update = grad.mul_(avg.rsqrt())
                stats.append(torch.cat([param_sq, squared_sum(update).reshape(1)]))
            else:
                matrices, rows, cols = shard.matrix
                row_sums, col_sums = row_col_sums(sq.reshape(-1), shard.flat_start, rows, cols, matrices)
                stats.append(torch.cat([row_sums / cols, col_sums / rows, param_sq]))
            del sq
        self._sum_over_ranks(stats, shards)
        update_sqs: list[torch.Tensor] = []
        for grad, state, beta2t, shard, totals in zip(grads, states, beta2ts, shards, stats):
            if shard.matrix is None:
                update_sqs.append(totals[1])
                continue
            matrices, rows, cols = shard.matrix
            row = state["exp_avg_sq_row"].mul_(beta2t).add_(totals[:matrices * rows], alpha=1.0 - beta2t)
            col = state["exp_avg_sq_col"].mul_(beta2t).add_(totals[matrices * rows:matrices * (rows + cols)],
                                                            alpha=1.0 - beta2t)
            if matrices == 1:
                row_factor = (row / row.mean()).rsqrt_()
            else:
                by_matrix = row.view(matrices, rows)
                row_factor = (by_matrix / by_matrix.mean(1, keepdim=True)).rsqrt_().reshape(-1)
            factor = outer_slice(row_factor, col.rsqrt(), shard.flat_start, shard.numel, matrices)
            update = grad.mul_(factor.view_as(grad))
            update_sqs.append(_per_matrix_squared_sums(update, shard))
        factored = [i for i, shard in enumerate(shards) if shard.matrix is not None]
        matrix_sqs = [update_sqs[i] for i in factored]
        self._sum_over_ranks(matrix_sqs, [shards[i] for i in factored])
        for i, total in zip(factored, matrix_sqs):
            update_sqs[i] = total
        for master, update, shard, totals, update_sq in zip(masters, grads, shards, stats, update_sqs):
            matrices = 1 if shard.matrix is None else shard.matrix[0]
            param_sq = totals[:1] if shard.matrix is None else totals[-matrices:]
            numel = shard.global_numel // matrices
            clip = ((update_sq / numel).sqrt() / self.clip_threshold).clamp(min=1.0)
            step_size = lr * (param_sq / numel).sqrt().clamp(min=self.eps2)
            if matrices > 1:  # each element by its expert's figures
                clip, step_size = (per_matrix(v, shard.flat_start, shard.numel, numel).view_as(update)
                                   for v in (clip, step_size))
            update.div_(clip)
            if self.weight_decay:
                master.mul_(1.0 - step_size * self.weight_decay)
            master.sub_(update.mul_(step_size))

    @staticmethod
    def _sum_over_ranks(tensors: list[torch.Tensor], shards: list[ShardInfo]) -> None:
        """Replace each tensor by its sum over its shard's ranks: one collective per distinct `reduce_sum` (an
        engine gives every parameter over the same ranks the same one), in the order they first appear, so
        every rank issues the same collectives."""
        by_reducer: dict[int, list[int]] = {}
        for i, shard in enumerate(shards):
            by_reducer.setdefault(id(shard.reduce_sum), []).append(i)
        for indices in by_reducer.values():
            flat = torch.cat([tensors[i] for i in indices])
            shards[indices[0]].reduce_sum(flat)
            for i, piece in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                tensors[i] = piece


def _per_matrix_squared_sums(t: torch.Tensor, shard: ShardInfo) -> torch.Tensor:
    """The squared sum of this slice of each matrix of the stack `shard` describes ([matrices]); of the whole
    slice ([1]) for a parameter of one matrix or fewer than two dims."""
    if shard.matrix is None or shard.matrix[0] == 1:
        return squared_sum(t).reshape(1)
    matrices, rows, cols = shard.matrix
    flat = t.reshape(-1)
    sums = flat.new_zeros(matrices, dtype=torch.float32)
    for lo, hi, matrix in matrix_segments(shard.flat_start, shard.numel, rows * cols):
        sums[matrix] = squared_sum(flat[lo:hi])
    return sums


INACTIVE_LR_FACTOR = {"sgd": 300.0, "signsgd": 1.0, "adalomo": 10.0}
"""lisa.inactive_lr when unset: optim.lr times this. SGD's step is the gradient's size (about 1 / sqrt(N) of a
clipped norm per element), signSGD's lr itself on every element (an Adam step's size), AdaLomo's lr relative to
each matrix's RMS. Calibrated on both quality benchmark tasks (docs/quality.md, "Choosing the inactive rates")."""


def inactive_lr(lisa: LisaConfig, optim: OptimConfig) -> float:
    """lisa.inactive_update's peak learning rate."""
    return lisa.inactive_lr if lisa.inactive_lr is not None else optim.lr * INACTIVE_LR_FACTOR[lisa.inactive_update]


def make_inactive_rule(lisa: LisaConfig, optim: OptimConfig) -> UpdateRule | None:
    """The state-free rule for the decoder units not sampled (lisa.inactive_update; None: they stay frozen).
    No weight decay: decaying every unit at every step is not LISA's."""
    if lisa.inactive_update == "none":
        return None
    if lisa.inactive_update == "sgd":
        return Sgd(0.0, 0.0, fused=True)
    if lisa.inactive_update == "signsgd":
        return SignSgd()
    return AdaLomo((optim.adalomo_eps[0], optim.adalomo_eps[1]), optim.adalomo_decay_rate,
                   optim.adalomo_clip_threshold, 0.0)


def make_rule(c: OptimConfig) -> UpdateRule:
    if c.name == "adamw":
        return AdamW((c.betas[0], c.betas[1]), c.eps, c.weight_decay)
    if c.name == "sgd":
        return Sgd(c.momentum, c.weight_decay)
    if c.name == "lomo":
        return Sgd(0.0, c.weight_decay, fused=True)
    if c.name == "adalomo":
        return AdaLomo((c.adalomo_eps[0], c.adalomo_eps[1]), c.adalomo_decay_rate, c.adalomo_clip_threshold,
                       c.weight_decay)
    raise ConfigError(f"optim.name must be one of 'adamw', 'sgd', 'lomo', 'adalomo', got {c.name!r}")
