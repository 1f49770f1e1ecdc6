"""Training: configuration, optimizer and schedule, the loop, and its outputs."""
from plait.train.config import TrainConfig, TrainConfigError, load_toml
from plait.train.trainer import IGNORE_INDEX, Trainer, model_config_for

__all__ = ["IGNORE_INDEX", "TrainConfig", "TrainConfigError", "Trainer", "load_toml", "model_config_for"]
