"""Plain-PyTorch models: no parallel code lives here."""
from plait.models.config import PRESETS, ConfigError, LlamaConfig, RopeScaling, RopeType, get_preset
from plait.models.init import (build_meta_model, build_model, init_parameters, initial_value, model_parameters,
                               parameter_seed)
from plait.models.llama import LlamaForCausalLM

__all__ = ["PRESETS", "ConfigError", "LlamaConfig", "LlamaForCausalLM", "RopeScaling", "RopeType", "build_meta_model",
           "build_model", "get_preset", "init_parameters", "initial_value", "model_parameters", "parameter_seed"]
