"""Mixture-of-experts specifics: the routers, and the router's load-balancing loss as each family defines it.

transformers gives every MoE causal LM the same handles: `model.num_experts`, `model.num_experts_per_tok` and
`model.router_aux_loss_coef`, the routers' logits from a forward with `output_router_logits=True`, and a
`load_balancing_loss_func` in the family's modeling module. lisa_dist calls that function on each micro-batch
with the batch's attention mask, so padding never counts as routed tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lisa_dist.config import Config
from lisa_dist.errors import ConfigError


def router_modules(module: nn.Module) -> list[nn.Module]:
    """The routers inside `module` (transformers names their classes `...Router`)."""
    return [m for m in module.modules() if type(m).__name__.lower().endswith("router")]


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The modules holding routed experts as 3-D parameters (a ZeRO-3 partition keeps its shape in `ds_shape`)."""
    return [m for m in model.modules()
            if any(len(getattr(p, "ds_shape", p.shape)) == 3 for p in m.parameters(recurse=False))]


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
    if config.method == "lisa" and config.lisa.strategy == "outlier" and is_moe(model):
        raise ConfigError(f"lisa.strategy=outlier: it scores a layer by its linear modules' outlier weights, and "
                          f"{type(model).__name__}'s routed experts are not linear modules, so the layers' scores "
                          "would leave out most of their weights; use uniform, weights, grad_norm or cyclic")
    if config.model.freeze_routers and not is_moe(model):
        raise ConfigError(f"model.freeze_routers=true: {type(model).__name__} has no routers (it is not a "
                          "mixture-of-experts model)")
    router_aux(config, model)


def _routed_indices(output: Any) -> torch.Tensor | None:
    """The expert indices a router returned: its one integer tensor (tokens x top_k)."""
    outputs = output if isinstance(output, tuple) else (output,)
    return next((t for t in outputs if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer in the step's forwards, counted on the device from the
    routers' choices (a token counts once for each of its top-k experts). Padding is left out; evaluation and
    the recomputation of checkpointed layers in backward are not counted (only forwards inside `counting`)."""

    def __init__(self, layers: Sequence[nn.Module], num_experts: int, device: torch.device) -> None:
        self.names: list[str] = []
        """Per router: its decoder layer's index ("3"; "3.1" for a layer's second router)."""
        self.routers: list[nn.Module] = []
        for index, layer in enumerate(layers):
            routers = router_modules(layer)
            self.routers += routers
            self.names += [str(index) if len(routers) == 1 else f"{index}.{j}" for j in range(len(routers))]
        self.counts = torch.zeros(len(self.routers), num_experts, dtype=torch.float64, device=device)
        self.counted = [False] * len(self.routers)
        """Whether the router's output held indices to count (an unknown router's may not)."""
        self._mask: torch.Tensor | None = None
        self._counting = False

    @classmethod
    def of(cls, layers: Sequence[nn.Module], hf_config: Any, device: torch.device) -> ExpertLoad | None:
        """The counter of a model's decoder `layers`, None for a dense model."""
        experts = routed_experts(hf_config)
        if not experts:
            return None
        load = cls(layers, experts, device)
        return load if load.routers else None

    def register(self) -> list[RemovableHandle]:
        return [router.register_forward_hook(partial(self._count, row)) for row, router in enumerate(self.routers)]

    def _count(self, row: int, module: nn.Module, args: Any, output: Any) -> None:
        indices = _routed_indices(output) if self._counting else None
        if indices is None:
            return
        indices = indices.reshape(-1, indices.shape[-1])
        weight = torch.ones_like(indices, dtype=self.counts.dtype)
        if self._mask is not None and self._mask.numel() == indices.shape[0]:
            weight = self._mask.reshape(-1, 1).to(self.counts.dtype).expand_as(indices)
        self.counts[row].index_add_(0, indices.flatten().to(self.counts.device), weight.flatten())
        self.counted[row] = True

    @contextmanager
    def counting(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Count the routers' choices of the forwards inside, leaving out positions where `attention_mask` is 0."""
        self._mask = None if attention_mask is None else attention_mask.to(self.counts.device)
        self._counting = True
        try:
            yield
        finally:
            self._counting = False
            self._mask = None

    def reset(self) -> None:
        self.counts.zero_()

    def names_counted(self) -> list[str]:
        return [name for name, counted in zip(self.names, self.counted) if counted]

    def take(self) -> torch.Tensor:
        """The counted routers' rows since the last reset (routers x experts), and a reset."""
        rows = self.counts[[i for i, counted in enumerate(self.counted) if counted]].clone()
        self.reset()
        return rows
