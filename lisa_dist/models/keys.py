"""Checkpoint keys to module parameter names, through the same renamings `from_pretrained` applies.

transformers 5 renames keys between a checkpoint file and the module (GPT-NeoX's `embed_out.` is the
module's `lm_head.`, legacy `LayerNorm.gamma` is `.weight`, a base model's keys lack the head's prefix).
Each rank reads only its rows, so lisa_dist cannot hand whole tensors to transformers' loader; it asks
transformers for the same rename rules instead and reads through them. A key that transformers must
*convert* (merge, split or transpose several stored tensors into one parameter) has no row-wise reading
and is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lisa_dist._compat import WeightConverter, WeightRenaming, get_model_conversion_mapping, rename_source_key


@dataclass(slots=True)
class KeyMap:
    stored: dict[str, str] = field(default_factory=dict)
    """Module name -> the key it is stored under."""
    converted: dict[str, str] = field(default_factory=dict)
    """Module name -> a stored key that transformers converts (not a plain rename) into it."""


def map_checkpoint_keys(model: nn.Module, stored_keys: list[str]) -> KeyMap:
    """Which stored key holds each of `model`'s state-dict entries, as `from_pretrained` would load it."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    out = KeyMap()
    for key in sorted(stored_keys):
        target, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:  # mirrors from_pretrained: keep the key, fix the prefix
            target, converter = rename_source_key(key, [], [], prefix, expected)
        if target not in expected:
            continue
        if converter is not None:
            out.converted.setdefault(target, key)
        else:
            out.stored.setdefault(target, key)
    return out
