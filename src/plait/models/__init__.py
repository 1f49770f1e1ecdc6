"""Plain-PyTorch models: no parallel code lives here.

The configurations and presets (plain data, which the command line reads) load with the
package; the modules and their initialisation, which need torch, on first use.
"""
from plait.lazy import on_first_use
from plait.models.config import PRESETS, ConfigError, LlamaConfig, RopeScaling, RopeType, get_preset

__getattr__ = on_first_use(__name__, {
    "LlamaForCausalLM": "plait.models.llama",
    **{name: "plait.models.init" for name in ("build_meta_model", "build_model", "init_parameters", "initial_value",
                                              "model_parameters", "parameter_seed")}})

__all__ = ["PRESETS", "ConfigError", "LlamaConfig", "LlamaForCausalLM", "RopeScaling", "RopeType", "build_meta_model",
           "build_model", "get_preset", "init_parameters", "initial_value", "model_parameters", "parameter_seed"]
