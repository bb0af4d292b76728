"""Model configs and parameter-free (meta) construction; weights are materialized by the engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from lisa_dist._compat import can_set_experts_implementation, set_attn_implementation, set_experts_implementation
from lisa_dist.config import Config, ConfigError
from lisa_dist.models.moe import check_moe_settings, routed_experts
from lisa_dist.models.parts import UnsupportedModelError, find_parts, sampling_units
from lisa_dist.models.presets import PRESETS
from lisa_dist.models.weights import SafetensorsReader

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class ModelSource:
    hf_config: transformers.PretrainedConfig
    weights_dir: Path | None
    """Directory of *.safetensors to load, or None for random initialization."""
    tokenizer_dir: Path


def _bundled_tokenizer() -> Path:
    from lisa_dist.assets import TINY_MODEL_DIR

    return TINY_MODEL_DIR


def load_hf_config(c: Config) -> tuple[transformers.PretrainedConfig, Path | None]:
    hf_config, weights_dir = _load_hf_config(c)
    if c.model.num_layers is not None:
        total = num_decoder_layers(hf_config)
        if c.model.num_layers > total:
            raise ConfigError(f"model.num_layers={c.model.num_layers} exceeds the model's {total} decoder layers")
        hf_config.num_hidden_layers = c.model.num_layers
    return hf_config, weights_dir


def _load_hf_config(c: Config) -> tuple[transformers.PretrainedConfig, Path | None]:
    if c.model.path:
        root = Path(c.model.path)
        if not (root / "config.json").is_file():
            raise ConfigError(f"model.path: {root} has no config.json (expected a Hugging Face model directory)")
        if not list(root.glob("*.safetensors")):
            raise ConfigError(f"model.path: {root} has no *.safetensors weights")
        return transformers.AutoConfig.from_pretrained(root), root
    if c.model.preset:
        if c.model.preset not in PRESETS:
            raise ConfigError(f"model.preset must be one of {', '.join(sorted(PRESETS))}, got {c.model.preset!r}")
        spec = dict(PRESETS[c.model.preset])
        return transformers.AutoConfig.for_model(spec.pop("model_type"), **spec), None
    path = Path(c.model.config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.config: file not found: {path}")
    return transformers.AutoConfig.from_pretrained(path), None


def resolve_model_source(c: Config) -> ModelSource:
    hf_config, weights_dir = load_hf_config(c)
    if c.model.tokenizer:
        tokenizer_dir = Path(c.model.tokenizer)
    elif weights_dir is not None:
        tokenizer_dir = weights_dir
    else:
        tokenizer_dir = _bundled_tokenizer()
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.glob("tokenizer*")):
        raise ConfigError(f"no tokenizer files in {tokenizer_dir}; set model.tokenizer to a tokenizer directory")
    return ModelSource(hf_config=hf_config, weights_dir=weights_dir, tokenizer_dir=tokenizer_dir)


def num_decoder_layers(hf_config: transformers.PretrainedConfig) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot tell the number of decoder layers of model type {hf_config.model_type!r}")


def check_against_model(c: Config, hf_config: transformers.PretrainedConfig) -> nn.Module:
    """Config checks that need the architecture but no weights and no process group; returns the fp32
    meta-device model they were made on (for `check_weights`)."""
    check_architecture(hf_config)
    max_positions = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if max_positions is not None and c.data.seq_len > max_positions:
        raise ConfigError(f"data.seq_len={c.data.seq_len} exceeds the model's {max_positions} positions")
    model = build_meta_model(hf_config, torch.float32, "eager")
    experts = c.model.experts_implementation
    if experts != "auto" and not routed_experts(hf_config):
        raise ConfigError(f"model.experts_implementation={experts}: {type(model).__name__} has no routed experts; "
                          "leave the key at auto")
    if experts != "auto" and not can_set_experts_implementation(model):
        raise ConfigError(f"model.experts_implementation={experts}: transformers computes {type(model).__name__}'s "
                          "experts one way only; leave the key at auto")
    if c.model.attn_implementation == "sdpa" and not getattr(model, "_supports_sdpa", True):
        raise ConfigError(f"{type(model).__name__} does not support model.attn_implementation=sdpa (transformers "
                          "has no scaled_dot_product_attention path for it); set model.attn_implementation=eager")
    check_model(c, model)
    return model


def model_config(hf_config: transformers.PretrainedConfig, attn_implementation: str,
                 experts_implementation: str) -> transformers.PretrainedConfig:
    """A copy of `hf_config` asking for these kernels (`auto`: transformers' choice of experts implementation)."""
    hf_config = hf_config.__class__.from_dict(hf_config.to_dict())
    set_attn_implementation(hf_config, attn_implementation)
    if experts_implementation != "auto":
        set_experts_implementation(hf_config, experts_implementation)
    return hf_config


def check_model(c: Config, model: nn.Module) -> None:
    """The checks of the config against a built model (lisa_dist's meta model, or a Trainer script's)."""
    parts = find_parts(model)
    units = len(sampling_units(parts, c.lisa.unit)) if c.method == "lisa" else num_decoder_layers(model.config)
    what = {"layer": "decoder layers", "block": "attention and MLP blocks (lisa.unit=block)",
            "expert": "routed experts and rests of layers (lisa.unit=expert)"}[c.lisa.unit]
    if c.method == "lisa" and c.lisa.gamma > units:
        raise ConfigError(f"lisa.gamma={c.lisa.gamma} exceeds the model's {units} {what}")
    if c.lisa.layer_weights is not None and len(c.lisa.layer_weights) != units:
        raise ConfigError(f"lisa.layer_weights has {len(c.lisa.layer_weights)} entries; the model has {units} {what}")
    check_moe_settings(c, model)
    if c.engine.layer_class is not None:
        found = type(parts.layers[0]).__name__
        if found != c.engine.layer_class:
            raise ConfigError(f"engine.layer_class={c.engine.layer_class!r} (accelerate's "
                              f"fsdp_transformer_layer_cls_to_wrap) but the model's decoder layers are {found}")


def check_architecture(hf_config: transformers.PretrainedConfig) -> None:
    """Refuse, naming the model class, the kinds of causal LM lisa_dist does not train."""
    causal_lms = transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    known = type(hf_config) in causal_lms
    names = ([causal_lms[type(hf_config)].__name__] if known else
             getattr(hf_config, "architectures", None) or [hf_config.model_type])
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else type(quantization).__name__
        raise UnsupportedModelError(f"{names[0]} is stored quantized ({method}): its weights cannot be sharded "
                                    "and trained in full; start from the model's bf16 or fp32 weights")
    sub = [k for k in ("vision_config", "audio_config", "text_config") if getattr(hf_config, k, None) is not None]
    if sub:
        raise UnsupportedModelError(f"{names[0]} is a multimodal model ({sub[0]}), which lisa_dist does not support; "
                                    "it trains causal language models")
    if not known:
        raise UnsupportedModelError(f"{names[0]} (model type {hf_config.model_type!r}) is not a causal language "
                                    "model transformers can build with AutoModelForCausalLM")


def check_weights(source: ModelSource, model: nn.Module) -> None:
    """Every weight `model` (a meta-device copy) needs is stored, in floating point and in its shape: read
    from the safetensors headers before any process group exists, so a bad checkpoint costs no start-up."""
    reader = open_weights(source, model)
    if reader is None:
        return
    try:
        for name, param in model.named_parameters():
            reader.check(name, list(param.shape))
    finally:
        reader.close()


def open_weights(source: ModelSource, model: nn.Module | None = None) -> SafetensorsReader | None:
    """A reader of `source`'s stored weights by module parameter name; None for random initialization.
    `model`, an unwrapped copy of the architecture (meta device is enough), gives the key renamings; one
    is built when it is not given."""
    if source.weights_dir is None:
        return None
    if model is None:
        model = build_meta_model(source.hf_config, torch.float32, "eager")
    return SafetensorsReader(source.weights_dir, model)


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (DeepSeek-V3's routing bias), by name; rotary tables are not among them."""
    return {f"{prefix}.{name}" if prefix else name: buffer for prefix, module in model.named_modules()
            for name, buffer in module._buffers.items()
            if buffer is not None and name not in module._non_persistent_buffers_set}


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers inside is moved to the meta device; buffers stay where they are
    made. accelerate's `init_empty_weights(include_buffers=False)` does the same but rebuilds each parameter
    from its `__dict__`, which fails for the fake tensors of `estimate` under torch 2.11."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_meta_model(hf_config: transformers.PretrainedConfig, dtype: torch.dtype, attn_implementation: str,
                     experts_implementation: str = "auto") -> nn.Module:
    """Parameters on the meta device in `dtype`; buffers (rotary tables) real, on CPU, in their own dtype."""
    hf_config = model_config(hf_config, attn_implementation, experts_implementation)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype != dtype:
                module.register_parameter(name, nn.Parameter(param.to(dtype), requires_grad=param.requires_grad))
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model
