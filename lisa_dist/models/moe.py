"""Mixture-of-experts specifics: the routers, and the router's load-balancing loss as each family defines it.

transformers gives every MoE causal LM the same handles: `model.num_experts`, `model.num_experts_per_tok` and
`model.router_aux_loss_coef`, the routers' logits from a forward with `output_router_logits=True`, and a
`load_balancing_loss_func` in the family's modeling module. lisa_dist calls that function on each micro-batch
with the batch's attention mask, so padding never counts as routed tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lisa_dist.config import Config
from lisa_dist.errors import ConfigError


def router_modules(module: nn.Module) -> list[nn.Module]:
    """The routers inside `module` (transformers names their classes `...Router`)."""
    return [m for m in module.modules() if type(m).__name__.lower().endswith("router")]


def is_moe(model: nn.Module) -> bool:
    return bool(router_modules(model))


def routed_experts(hf_config: Any) -> int:
    """The routed experts per layer a model config names (0 for a dense model)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


@dataclass(frozen=True, slots=True)
class RouterAux:
    """The load-balancing loss of one forward: `loss(router_logits, attention_mask)`, weighted by `coef`."""

    coef: float
    num_experts: int
    top_k: int
    function: Callable[..., Any]

    def loss(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        value = self.function(router_logits, self.num_experts, self.top_k, attention_mask)
        return value if isinstance(value, torch.Tensor) else torch.zeros((), device=router_logits[0].device)


def _family_function(model: nn.Module) -> Callable[..., Any] | None:
    """The family's `load_balancing_loss_func`, found through the model's classes (FSDP2 subclasses them)."""
    for cls in type(model).__mro__:
        function = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if function is not None:
            return function
    return None


def router_aux(config: Config, model: nn.Module) -> RouterAux | None:
    """The load-balancing loss `config` asks for on `model` (a meta-device copy is enough), None when off;
    a ConfigError naming the key when the model has none to add."""
    hf_config = model.config
    coef = config.model.router_aux_loss_coef
    if coef is None:
        coef = getattr(hf_config, "router_aux_loss_coef", 0.0) if getattr(hf_config, "output_router_logits", False) \
            else 0.0
    if coef < 0:
        raise ConfigError(f"model.router_aux_loss_coef must be >= 0, got {coef}")
    function = _family_function(model)
    if coef and (function is None or not hasattr(model, "num_experts")):
        raise ConfigError(f"model.router_aux_loss_coef={coef}: {type(model).__name__} has no router load-balancing "
                          "loss in transformers (its routing balances without one); set it to 0")
    if not coef:
        return None
    return RouterAux(float(coef), int(model.num_experts), int(model.num_experts_per_tok), function)


def check_moe_settings(config: Config, model: nn.Module) -> None:
    """Before start: the MoE keys fit the model."""
    if config.model.freeze_routers and not is_moe(model):
        raise ConfigError(f"model.freeze_routers=true: {type(model).__name__} has no routers (it is not a "
                          "mixture-of-experts model)")
    router_aux(config, model)
