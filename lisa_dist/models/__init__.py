from lisa_dist.models.build import ModelSource, build_meta_model, load_hf_config, resolve_model_source
from lisa_dist.models.parts import ModelParts, find_parts, set_trainable_layers
from lisa_dist.models.presets import PRESETS

__all__ = ["ModelParts", "ModelSource", "PRESETS", "build_meta_model", "find_parts", "load_hf_config",
           "resolve_model_source"]
