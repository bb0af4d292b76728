"""Checkpoint keys to module parameter names, through the same renamings `from_pretrained` applies.

transformers 5 renames keys between a checkpoint file and the module (GPT-NeoX's `embed_out.` is the
module's `lm_head.`, legacy `LayerNorm.gamma` is `.weight`, a base model's keys lack the head's prefix).
Each rank reads only its rows, so lisa_dist cannot hand whole tensors to transformers' loader; it asks
transformers for the same rules instead and reads through them.

A mixture-of-experts layer holds its routed experts as 3-D parameters ([experts, ...]) that most checkpoints
store one tensor per expert: transformers stacks them (`MergeModulelist(dim=0)`) and, for gate and up
projections, concatenates the stacks within each expert (`Concatenate(dim)`). Rows of such a parameter are
whole experts, read expert by expert (`ExpertMerge`). Any other conversion (a split, a transpose, an
interleave, a dequantization) has no row-wise reading and is refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from lisa_dist._compat import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                               get_model_conversion_mapping, rename_source_key)


@dataclass(slots=True)
class ExpertMerge:
    """A parameter transformers builds from one stored tensor per expert and per source pattern."""

    patterns: list[str]
    """The converter's source patterns, in its order (gate before up)."""
    concat_dim: int
    """The dimension of one expert's tensor along which the patterns' tensors are concatenated."""
    keys: dict[str, dict[int, str]] = field(default_factory=dict)
    """Per pattern, each expert's stored key."""

    def expert_keys(self, expert: int) -> list[str]:
        """The stored keys of `expert`, one per pattern, in the converter's order."""
        return [self.keys[p][expert] for p in self.patterns]

    def num_experts(self) -> int:
        return len(self.keys[self.patterns[0]])

    def missing(self) -> str | None:
        """A description of the first expert key the checkpoint lacks, or None."""
        count = max(len(self.keys.get(p, {})) for p in self.patterns)
        for pattern in self.patterns:
            absent = [i for i in range(count) if i not in self.keys.get(pattern, {})]
            if absent:
                return f"expert {absent[0]} of {pattern!r}"
        return None


@dataclass(slots=True)
class KeyMap:
    stored: dict[str, str] = field(default_factory=dict)
    """Module name -> the key it is stored under."""
    merged: dict[str, ExpertMerge] = field(default_factory=dict)
    """Module name -> the per-expert keys transformers stacks into it."""
    converted: dict[str, str] = field(default_factory=dict)
    """Module name -> a stored key that transformers converts in a way no row can be read from, and how."""


def _merge_rule(converter: WeightConverter) -> int | None:
    """The concatenation dimension within one expert if `converter` only stacks experts (and concatenates
    the stacks along a later dimension), else None."""
    ops = list(converter.operations)
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        return 0
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim >= 1:
        return ops[1].dim - 1
    return None


def _expert_index(pattern: str, key: str) -> int | None:
    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    return int(match.group(1)) if match else None


def map_checkpoint_keys(model: nn.Module, stored_keys: list[str]) -> KeyMap:
    """Which stored key (or per-expert keys) holds each of `model`'s state-dict entries, as `from_pretrained`
    would load it."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    out = KeyMap()
    for key in sorted(stored_keys):
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:  # mirrors from_pretrained: keep the key, fix the prefix
            target, pattern = rename_source_key(key, [], [], prefix, expected)
        if target not in expected:
            continue
        if pattern is None:
            out.stored.setdefault(target, key)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        concat_dim = _merge_rule(converter)
        index = _expert_index(pattern, key)
        if concat_dim is None or index is None:
            ops = ", ".join(type(op).__name__ for op in converter.operations)
            out.converted.setdefault(target, f"{key!r} ({ops})")
            continue
        merge = out.merged.setdefault(target, ExpertMerge(list(converter.source_patterns), concat_dim))
        merge.keys.setdefault(pattern, {})[index] = key
    for target in out.converted:
        out.merged.pop(target, None)
    return out
