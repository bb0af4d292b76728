import pytest
import torch
import transformers
from torch import nn

from lisa_dist.models import build_meta_model, find_parts
from lisa_dist.errors import UnsupportedModelError

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("llama", {"tie_word_embeddings": True}),
])
def test_parts_of_llama_family(model_type, extra):
    config = transformers.AutoConfig.for_model(model_type, **SMALL, **extra)
    model = build_meta_model(config, torch.bfloat16, "sdpa")
    parts = find_parts(model)
    assert parts.num_layers == 3 and parts.layers[0] is model.model.layers[0]
    assert parts.norm is model.model.norm and parts.head is model.lm_head
    assert parts.tied_embeddings == bool(extra.get("tie_word_embeddings"))
    assert all(p.dtype == torch.bfloat16 and p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())


def test_parts_of_gpt2_with_position_embeddings_and_tied_head():
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    model = build_meta_model(config, torch.float32, "eager")
    parts = find_parts(model)
    assert parts.num_layers == 2 and parts.norm is model.transformer.ln_f
    assert parts.embeddings == [model.transformer.wte, model.transformer.wpe]
    assert parts.tied_embeddings


def test_model_without_a_decoder_stack_is_a_clear_error():
    class NoStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="cannot find the decoder stack of NoStack"):
        find_parts(NoStack())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox"])
def test_every_family_has_its_stack_norm_and_head_found(family):
    from tests.families import LAYERS, hf_config

    model = build_meta_model(hf_config(family), torch.float32, "eager")
    parts = find_parts(model)
    assert parts.num_layers == LAYERS and parts.head is model.get_output_embeddings()
    assert parts.norm is not None and parts.norm not in list(parts.layers[-1].modules())
    assert parts.tied_embeddings == (family in ("qwen2", "gemma2", "gpt2"))


def test_checkpoint_keys_map_through_the_renamings_from_pretrained_applies():
    from lisa_dist.models.keys import map_checkpoint_keys
    from tests.families import hf_config

    model = build_meta_model(hf_config("gpt_neox"), torch.float32, "eager")
    names = [n for n, _ in model.named_parameters()]
    stored = [("embed_out.weight" if n == "lm_head.weight" else n) for n in names]
    keys = map_checkpoint_keys(model, stored)
    assert keys.stored["lm_head.weight"] == "embed_out.weight"
    assert all(keys.stored[n] == n for n in names if n != "lm_head.weight")
    # a base model's checkpoint (no `gpt_neox.` prefix) maps too, as from_pretrained loads it
    base = map_checkpoint_keys(model, [n.removeprefix("gpt_neox.") for n in names])
    assert base.stored["gpt_neox.layers.0.attention.dense.weight"] == "layers.0.attention.dense.weight"


@pytest.mark.parametrize("model_type, spec, message", [
    ("gpt_oss", {"quantization_config": {"quant_method": "mxfp4"}}, r"GptOssForCausalLM is stored quantized \(mxfp4\)"),
    ("llava", {}, "is a multimodal model"),
    ("t5", {}, "is not a causal language model"),
])
def test_unsupported_architectures_are_named_before_start(model_type, spec, message):
    from lisa_dist.models.build import check_architecture

    with pytest.raises(UnsupportedModelError, match=message):
        check_architecture(transformers.AutoConfig.for_model(model_type, **spec))


def test_a_checkpoint_stored_one_tensor_per_expert_maps_to_the_stacked_experts():
    """transformers stacks Mixtral's w1 and w3 per expert into `gate_up_proj` and w2 into `down_proj`: each
    expert's keys are found, in the converter's order (gate before up)."""
    from lisa_dist.models.keys import map_checkpoint_keys

    config = transformers.AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=8, intermediate_size=4,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               num_local_experts=3, num_experts_per_tok=2)
    model = build_meta_model(config, torch.float32, "eager")
    stored = [n for n in model.state_dict() if ".experts." not in n]
    stored = [n.replace(".mlp.", ".block_sparse_moe.") for n in stored]
    stored += [f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(3) for w in ("w1", "w2", "w3")]
    keys = map_checkpoint_keys(model, stored)
    gate_up = keys.merged["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.concat_dim == 0 and gate_up.num_experts() == 3
    assert gate_up.expert_keys(2) == ["model.layers.0.block_sparse_moe.experts.2.w1.weight",
                                      "model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    assert keys.merged["model.layers.0.mlp.experts.down_proj"].expert_keys(1) == [
        "model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    assert keys.stored["model.layers.0.mlp.gate.weight"] == "model.layers.0.block_sparse_moe.gate.weight"
    assert not keys.converted


def test_the_router_loss_follows_the_key_else_the_model_config_and_is_refused_where_there_is_none():
    from lisa_dist.errors import ConfigError
    from lisa_dist.models.moe import check_moe_settings, router_aux
    from tests.families import hf_config
    from tests.helpers import tiny_config

    def config(**model):
        return tiny_config("unused", model=model)

    mixtral = build_meta_model(hf_config("mixtral"), torch.float32, "eager")
    assert router_aux(config(), mixtral) is None  # output_router_logits is false in the model config
    assert router_aux(config(router_aux_loss_coef=0.0), mixtral) is None
    aux = router_aux(config(router_aux_loss_coef=0.3), mixtral)
    assert (aux.coef, aux.num_experts, aux.top_k) == (0.3, 8, 2)
    mixtral.config.output_router_logits = True
    assert router_aux(config(), mixtral).coef == mixtral.config.router_aux_loss_coef
    with pytest.raises(ConfigError, match="model.router_aux_loss_coef must be >= 0"):
        router_aux(config(router_aux_loss_coef=-1.0), mixtral)
    deepseek = build_meta_model(hf_config("deepseek_v3"), torch.float32, "eager")
    with pytest.raises(ConfigError, match="DeepseekV3ForCausalLM has no router load-balancing loss"):
        check_moe_settings(config(router_aux_loss_coef=0.1), deepseek)
    llama = build_meta_model(hf_config("llama"), torch.float32, "eager")
    with pytest.raises(ConfigError, match="model.freeze_routers=true: LlamaForCausalLM has no routers"):
        check_moe_settings(config(freeze_routers=True), llama)
