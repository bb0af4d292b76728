"""Element-wise update rules on one fp32 shard; they never see the full tensor or the engine."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from lisa_dist.config import OptimConfig


class UpdateRule(Protocol):
    def init_state(self, master: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float) -> None: ...


class AdamW:
    """Decoupled weight decay Adam, the same arithmetic as `torch.optim.AdamW` (amsgrad off)."""

    def __init__(self, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay

    def init_state(self, master: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float) -> None:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if self.weight_decay:
            master.mul_(1 - lr * self.weight_decay)
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = lr / (1 - self.beta1 ** step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - self.beta2 ** step)).add_(self.eps)
        master.addcdiv_(exp_avg, denom, value=-step_size)


class Sgd:
    """SGD with optional momentum (no dampening) and L2 weight decay, as `torch.optim.SGD`."""

    def __init__(self, momentum: float, weight_decay: float) -> None:
        self.momentum = momentum
        self.weight_decay = weight_decay

    def init_state(self, master: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(master)} if self.momentum else {}

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               step: int, lr: float) -> None:
        if self.weight_decay:
            grad = grad.add(master, alpha=self.weight_decay)
        if self.momentum:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(grad)
            else:
                buf.mul_(self.momentum).add_(grad)
            grad = buf
        master.add_(grad, alpha=-lr)


def make_rule(c: OptimConfig) -> UpdateRule:
    if c.name == "adamw":
        return AdamW((c.betas[0], c.betas[1]), c.eps, c.weight_decay)
    if c.name == "sgd":
        return Sgd(c.momentum, c.weight_decay)
    raise ValueError(f"optim.name must be one of 'adamw', 'sgd', got {c.name!r}")
