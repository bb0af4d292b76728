from lisa_dist.models.build import ModelSource, build_meta_model, load_hf_config, resolve_model_source
from lisa_dist.models.parts import ModelParts, SampledUnit, find_parts, sampling_units, set_trainable_units
from lisa_dist.models.presets import PRESETS

__all__ = ["ModelParts", "ModelSource", "PRESETS", "SampledUnit", "build_meta_model", "find_parts", "load_hf_config",
           "resolve_model_source", "sampling_units", "set_trainable_units"]
