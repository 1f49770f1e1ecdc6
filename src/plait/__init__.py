"""plait: train Transformer language models with composable parallelism."""
__version__ = "0.1.0"
