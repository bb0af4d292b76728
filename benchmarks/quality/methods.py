"""The methods the benchmark compares, each as the `lisa-dist train` overrides that select it (LoRA, which
lisa_dist does not do, runs through peft in `lora.py`).

Learning rates are one per optimizer family, not per strategy: every LISA strategy shares AdamW's.
LISA runs at LMFlow's defaults, gamma 2 of the 8 layers and K = 20 steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.quality.pretrain import MOE_BASE, BaseModel

ADAMW_LR = 1e-3
LOMO_LR = 1e-2
ADALOMO_LR = 1e-3
LORA_LR = 3e-3
GAMMA, INTERVAL = 2, 20


@dataclass(frozen=True)
class Method:
    name: str
    overrides: list[str] = field(default_factory=list)
    lora: bool = False
    """Trained by `lora.py` (peft) instead of lisa-dist."""


def _lisa(strategy: str, *extra: str, optim: str = "adamw", lr: float = ADAMW_LR) -> list[str]:
    return ["method=lisa", f"lisa.gamma={GAMMA}", f"lisa.interval={INTERVAL}", f"lisa.strategy={strategy}",
            f"optim.name={optim}", f"optim.lr={lr}", *extra]


# `weights` tests one a-priori guess: the lower a layer, the likelier (8 down to 1), since a draw that
# missed the lowest layers was where uniform LISA failed on this task.
BOTTOM_HEAVY = "lisa.layer_weights=[8,7,6,5,4,3,2,1]"

def expert_gamma(spec: BaseModel) -> int:
    """gamma over expert units (each layer's rest, and each expert) at layer units' optimizer memory: GAMMA
    layers' elements over the mean unit's."""
    h, heads, kv = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads
    attention = 2 * h * h + 2 * h * (h // heads * kv)
    rest = attention + h * spec.experts + 2 * h  # with the router and the two norms
    expert = 3 * h * spec.intermediate_size
    layer = rest + spec.experts * expert
    mean_unit = (rest + spec.experts * expert) / (1 + spec.experts)
    return round(GAMMA * layer / mean_unit)


METHODS = {m.name: m for m in [
    Method("full_adamw", ["method=full", "optim.name=adamw", f"optim.lr={ADAMW_LR}"]),
    Method("lora", lora=True),
    Method("lisa_uniform", _lisa("uniform")),
    Method("lisa_weights", _lisa("weights", BOTTOM_HEAVY)),
    Method("lisa_outlier", _lisa("outlier")),
    Method("lisa_grad_norm", _lisa("grad_norm")),
    Method("lisa_cyclic", _lisa("cyclic")),
    Method("lisa_block_uniform", _lisa("uniform", "lisa.unit=block", f"lisa.gamma={2 * GAMMA}")),
    Method("lomo", ["method=full", "optim.name=lomo", f"optim.lr={LOMO_LR}"]),
    Method("adalomo", ["method=full", "optim.name=adalomo", f"optim.lr={ADALOMO_LR}"]),
    Method("lisa_adalomo", _lisa("uniform", optim="adalomo", lr=ADALOMO_LR)),
    *(Method(f"lisa_inactive_{rule}", _lisa("uniform", f"lisa.inactive_update={rule}"))
      for rule in ("sgd", "signsgd", "adalomo")),
    Method("lisa_expert_uniform", _lisa("uniform", "lisa.unit=expert", f"lisa.gamma={expert_gamma(MOE_BASE)}")),
    Method("lisa_expert_routing", _lisa("routing", "lisa.unit=expert", f"lisa.gamma={expert_gamma(MOE_BASE)}")),
]}

STRINGS_METHODS = ["full_adamw", "lora", "lisa_uniform", "lisa_grad_norm", "lisa_inactive_sgd", "lisa_inactive_signsgd",
                   "lisa_inactive_adalomo", "adalomo"]
"""On the string-transformation task (`--task strings`): LISA with each state-free rule for the units it did not
sample (`lisa.inactive_update`, its default rate) beside full fine-tuning, LoRA, plain LISA and AdaLomo."""

MOE_METHODS = ["full_adamw", "lisa_uniform", "lisa_expert_uniform", "lisa_expert_routing"]
"""On the mixture-of-experts base (`--base moe`): LISA over layers (gamma 2) and over experts at the same
optimizer memory (`expert_gamma`)."""
