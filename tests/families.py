"""Random-weight Hugging Face directories, written by `save_pretrained`, for the decoder families users bring.

Small shapes (4 layers, width 32, the bundled tokenizer's 512 tokens) with what makes each family itself:
sliding windows, tied embeddings, q/k norms, soft-capping, fused projections, Conv1D and learned positions, and
a checkpoint that keeps its head under the legacy key `from_pretrained` renames."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from lisa_dist.assets import TINY_MODEL_DIR

LAYERS = 4
_COMMON: dict[str, Any] = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=16, **_COMMON),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **_COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=8, tie_word_embeddings=False, **_COMMON),
    "gemma2": dict(model_type="gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **_COMMON),
    "phi3": dict(model_type="phi3", pad_token_id=0, **_COMMON),
    "gpt2": dict(model_type="gpt2", vocab_size=512, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=512, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64,
                     hidden_dropout=0.0, attention_dropout=0.0),
}
# Mixtures of experts at small shapes: 8 routed experts, top 2, with what makes each family itself (shared
# experts, q/k norms, MLA attention and dense first layers, experts stored fused with biases and attention sinks,
# experts stored as one linear per layer).
_MOE = dict(vocab_size=512, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, num_experts_per_tok=2)
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": dict(model_type="mixtral", intermediate_size=16, num_local_experts=8, **_MOE),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, num_experts=8, **_MOE),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                      head_dim=8, **_MOE),
    "olmoe": dict(model_type="olmoe", intermediate_size=16, num_experts=8, eos_token_id=2, pad_token_id=0, **_MOE),
    "deepseek_v3": dict(model_type="deepseek_v3", intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        **{**_MOE, "num_key_value_heads": 4}),  # MLA: keys and values have every head
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=16, num_local_experts=8, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2), **_MOE),
    "granitemoe": dict(model_type="granitemoe", intermediate_size=16, num_local_experts=8, **_MOE),
}
FAMILIES_BY_NAME = {**FAMILIES, **MOE_FAMILIES}
# What the family's attention needs from lisa_dist's model.attn_implementation (sdpa unless listed).
ATTENTION = {"gemma2": "eager", "gpt_oss": "eager"}
# Stored keys as the family's public checkpoints have them, where transformers renames them on load.
LEGACY_KEYS = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}


def hf_config(family: str) -> transformers.PretrainedConfig:
    spec = dict(FAMILIES_BY_NAME[family])
    return transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)


def write_family(family: str, directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """`save_pretrained` of a randomly initialized model of `family`, with the bundled tokenizer."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), dtype=dtype)
    model.save_pretrained(directory)
    for name in TINY_MODEL_DIR.glob("tokenizer*"):
        shutil.copy(name, directory / name.name)
    renames = LEGACY_KEYS.get(family)
    if renames:
        path = directory / "model.safetensors"
        tensors = load_file(path)
        save_file({renames.get(k, k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return directory


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name belongs to (`...layers.3.` or GPT-2's `...h.3.`), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


# Two runs whose weights agree within parity_atol (~1e-6) give router logits (32-wide dot products of O(1)
# hidden states, after at most 4 layers) that agree far within 1e-4; so do a router's own choice (on its softmax
# probabilities, whose rounding may equalize two logits) and a top-k of the logits it returned.
ROUTING_TIE = 1e-4


def routed_counts(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor, top_k: int) -> tuple[list, list]:
    """Per layer, the real tokens' top-k experts counted, and how many tokens had a k-th and (k+1)-th logit
    within ROUTING_TIE of each other (where two countings may choose differently)."""
    counts, ties = [], []
    real = mask.flatten().bool()
    for logits in router_logits:
        top = logits[real].topk(top_k + 1, dim=-1)
        counts.append(torch.bincount(top.indices[:, :top_k].flatten(), minlength=logits.shape[-1]).tolist())
        ties.append(int((top.values[:, top_k - 1] - top.values[:, top_k] < ROUTING_TIE).sum()))
    return counts, ties
