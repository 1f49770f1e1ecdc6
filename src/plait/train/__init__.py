"""Training: configuration, optimizer and schedule, the loop, and its outputs.

The configuration (which the command line parses) loads with the package; the trainer, which
needs torch, on first use.
"""
from plait.lazy import on_first_use
from plait.train.config import TrainConfig, TrainConfigError, load_toml

__getattr__ = on_first_use(__name__, {name: "plait.train.trainer"
                                      for name in ("IGNORE_INDEX", "Trainer", "model_config_for")})

__all__ = ["IGNORE_INDEX", "TrainConfig", "TrainConfigError", "Trainer", "load_toml", "model_config_for"]
